"""Tickets beside cards (issue 11): the catalogue (products, coach departures), orders with seat holds, the tickets
issued (signed QR token and pickup code, wire.ticket) and the keys they are made with.

- :mod:`backoffice.tickets.catalogue`: products and departures, GTFS trips import.
- :mod:`backoffice.tickets.orders`: create (seats held), pay (once), issue, use, expire, refund eligibility.
- :mod:`backoffice.tickets.keys`: the ticket signing key and each operator's pickup key.
"""
