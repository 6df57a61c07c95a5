"""The API's routers, one per domain. Each endpoint names the roles that own it (backoffice.web.auth.owned_by)."""

from backoffice.web.api import (
    cards,
    clearing,
    devices,
    ota,
    payments_recon,
    quarantine,
    reconcile,
    registry,
    registry_edit,
    reports,
)

ROUTERS = (registry.router, clearing.router, devices.router, cards.router, ota.router, reconcile.router,
           registry_edit.router, reports.router, payments_recon.router,
           quarantine.router)  # the review of quarantined records (release, reject)
from backoffice.web.api import rider  # noqa: E402  rider self-service for the mobile operator's gateway
ROUTERS += (rider.router,)
from backoffice.web.api import partner  # noqa: E402  the operator's app sells tickets (issue 11, role partner)
ROUTERS += (partner.router,)
from backoffice.web.api import sms  # noqa: E402  the SMS gateway's webhook (riders' texts: backoffice.sms)
ROUTERS += (sms.router,)
from backoffice.web.api import tickets_counter  # noqa: E402  the station counter redeems pickup codes
ROUTERS += (tickets_counter.router,)
