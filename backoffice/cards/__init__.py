"""Cards and money, as the mobile operator's staff and the phone menu see them: issuance, counter and over-the-air
top-ups, a ledger per card with cases for review, loss reporting, refunds and adjustments, each with an audit record.

Each module is a set of use cases: functions with keyword-only arguments that take a SQLAlchemy ``Connection`` the
caller has begun (``with engine.begin() as conn``) and do their work in it; the caller's commit makes it stand.
Card cryptography goes through a :class:`backoffice.keyservice.KeyService`; a card itself is reached through
anything with ``exchange(apdu) -> response`` (a reader's card session, or a phone relaying to its SIM).
"""
