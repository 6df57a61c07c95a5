"""Registry forms for clerks and operations: add, edit and retire routes, vehicles, drivers and validators, and each
entry's history (its versions and audit lines).

``/manage/{kind}`` lists the entries with the add form; ``/manage/{kind}/{key}`` shows one with its edit and retire
forms and its history. Each form is a thin view over the same function the API calls
(backoffice.web.api.registry_edit), signed with the login's name; a refusal (the registry's rule, a taken code, a
fare that is not yuan) is shown on the same page with its reason. Fares are typed in yuan and read into fen
without a float; a blank field in an edit form keeps what is there.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import Connection

from backoffice.web import reads
from backoffice.web.api import registry_edit as edit_api
from backoffice.web.deps import Services, connection, services
from backoffice.web.auth import Principal, page_of
from backoffice.web.csrf import check_csrf as _check_csrf
from backoffice.web.csrf import csrf_token
from backoffice.web.pages import render, templates
from backoffice.web.pages_cards import to_fen

router = APIRouter(include_in_schema=False)
Who = Annotated[Principal, Depends(page_of(*edit_api.OWNERS))]
OUT = "-"  # the validator's vehicle field: taken out of its bus
# (Chinese, English) labels the templates show one of with t(*label)
ACTIONS = {"add": ("新增", "add"), "edit": ("修改", "edit"), "retire": ("停用", "retire"), "assign": ("分配", "assign")}
DONE = {"added": ("已新增", "Added"), "edited": ("已修改", "Saved"), "retired": ("已停用", "Retired")}
KEY_LABELS = {"code": ("编号", "Code"), "staff_no": ("工号", "Staff no."), "device_id": ("车载机", "Validator")}
FIELD_LABELS = {"name": ("名称", "Name"), "flat_fare": ("票价", "Fare"),
                "max_trip_minutes": ("最长行程(分)", "Max trip (min)"), "plate": ("车牌", "Plate"),
                "card_asn": ("司机卡", "Driver card"), "vehicle": ("车辆", "Vehicle"),
                "terminal_id": ("终端号", "PSAM terminal")}
templates.env.globals.update(REGISTRY_ACTIONS=ACTIONS, REGISTRY_DONE=DONE, REGISTRY_KEYS=KEY_LABELS,
                             REGISTRY_FIELDS=FIELD_LABELS)


def _kind(kind: str) -> str:
    if kind not in edit_api.KINDS:
        raise HTTPException(404, (f"没有“{kind}”这类资料；可维护：{'、'.join(edit_api.KINDS)}",
                                  f"no registry form for {kind!r}; there are {', '.join(edit_api.KINDS)}"))
    return kind


def _stages(text: str) -> list[tuple[int, int]] | None:
    """'10:2, 20:3.50' -> [(10, 200), (20, 350)]: up to that many stops, the fare in yuan."""
    if not text.strip():
        return None
    out = []
    for part in text.replace("，", ",").split(","):
        up, sep, fare = part.partition(":")
        if not sep or not up.strip().isdigit():
            raise ValueError(f"stage {part.strip()!r}: write 'up to stops:fare in yuan', e.g. 10:2.00")
        out.append((int(up), to_fen(fare)))
    return out


def _stops(form) -> dict[int, list[str]] | None:
    lists = {d: form.get(f"stops{d}", "").replace(",", " ").split() for d in (0, 1)}
    return {d: s for d, s in lists.items() if s} or None


def _body(kind: str, form, *, adding: bool):
    """The API's body model from the form's fields (blank: not given)."""
    def given(name):
        value = (form.get(name) or "").strip()
        return value or None

    fields: dict = {}
    if adding:
        fields["operator"] = given("operator")
        fields[edit_api.KINDS[kind][1]] = given("key") or ""
    if kind == "routes":
        fare = given("fare")
        fields.update(name=given("name"), flat_fare=to_fen(fare) if fare else None,
                      stages=_stages(form.get("stages", "")), stops=_stops(form))
    elif kind == "vehicles":
        fields.update(plate=given("plate"), fleet=given("fleet"))
    elif kind == "drivers":
        fields.update(name=given("name"), card_asn=given("card_asn"))
    else:
        vehicle = given("vehicle")
        fields["terminal_id"] = given("terminal_id")
        if vehicle is not None:  # in an edit, blank keeps the vehicle and "-" takes the validator out
            fields["vehicle"] = None if vehicle == OUT else vehicle
    if adding:
        fields = {k: v for k, v in fields.items() if v is not None or k == "operator"}
        if kind == "routes" and fields.get("name") is None:
            fields["name"] = ""
    else:
        fields = {k: v for k, v in fields.items() if v is not None or (kind == "devices" and k == "vehicle")}
    model = edit_api.BODIES[kind][0 if adding else 1]
    return model(**fields)


def _words(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'form'}: {err['msg']}" for err in e.errors())


def _attempt(svc: Services, fn) -> tuple[str | tuple[str, str] | None, object]:
    """Run one write; (its refusal's words or None, its result). The words are the registry's English, which the
    template's ``pick`` shows in Chinese on a Chinese page (backoffice.web.messages); a form field the API's model
    refused comes as a (Chinese, English) pair, the field's rule in the validator's English after a Chinese lead."""
    try:
        with edit_api.writing(svc) as conn:
            return None, fn(conn)
    except edit_api.RegistryRefused as e:
        return str(e), None
    except ValidationError as e:
        return (f"表单填写有误（{_words(e)}）", _words(e)), None
    except ValueError as e:  # a fare or stage typed wrongly
        return str(e), None
    except HTTPException as e:
        if e.status_code in (401, 403, 404):
            raise
        return str(e.detail), None


# ------------------------------------------------------------------------------------------------ list + add
def _list_page(request: Request, who: Principal, svc: Services, kind: str, *, error=None, status=200, done="",
               form=None) -> HTMLResponse:
    with svc.engine.connect() as conn:
        rows = reads.registry_list(conn, kind=kind, operator=who.scope(None))
        codes = [o["code"] for o in reads.registry_list(conn, kind="operators", operator=who.scope(None))]
        vehicles = reads.registry_list(conn, kind="vehicles", operator=who.scope(None))
    return render(request, "manage.html", who, status=status, kind=kind, kinds=list(edit_api.KINDS), rows=rows,
                  key_name=edit_api.KINDS[kind][1], codes=codes, vehicles=[v for v in vehicles if not v["retired_at"]],
                  error=error, done=done, form=form or {}, csrf=csrf_token(request))


@router.get("/manage/{kind}")
def manage_list(*, request: Request, kind: str, done: str = "", who: Who,
                svc: Annotated[Services, Depends(services)]) -> HTMLResponse:
    return _list_page(request, who, svc, _kind(kind), done=done)


@router.post("/manage/{kind}")
async def manage_add(*, request: Request, kind: str, who: Who, svc: Annotated[Services, Depends(services)]
                     ) -> Response:
    from starlette.concurrency import run_in_threadpool

    form = dict(await request.form())
    _check_csrf(request, form.get("csrf", ""))
    kind = _kind(kind)

    def work():
        error, key = _attempt(svc, lambda conn: edit_api.add(
            conn, who=who, kind=kind, body=_body(kind, form, adding=True), now=svc.clock()))
        if error is None:
            return RedirectResponse(f"/manage/{kind}/{key}?done=added", status_code=303)
        return _list_page(request, who, svc, kind, error=error, status=409, form=form)

    return await run_in_threadpool(work)


# ------------------------------------------------------------------------------------------------ one entry
def _item_page(request: Request, who: Principal, conn: Connection, kind: str, key: str, *, error=None,
               status=200, done="") -> HTMLResponse:
    found = edit_api.history(conn, who=who, kind=kind, key=key)
    vehicles = reads.registry_list(conn, kind="vehicles", operator=found["item"]["operator"])
    info = reads.operator_day(conn, operator=found["item"]["operator"])
    return render(request, "manage_item.html", who, status=status, kind=kind, key=key, item=found["item"],
                  tz=info[1] if info else None,
                  versions=found["versions"], audit=found["audit"], error=error, done=done, actions=ACTIONS,
                  fields=list(edit_api.registry.KINDS[edit_api.KINDS[kind][0]].fields),
                  vehicles=[v for v in vehicles if not v["retired_at"]], csrf=csrf_token(request), out=OUT)


@router.get("/manage/{kind}/{key}")
def manage_item(*, request: Request, kind: str, key: str, done: str = "", who: Who,
                conn: Annotated[Connection, Depends(connection)]) -> HTMLResponse:
    return _item_page(request, who, conn, _kind(kind), key, done=done)


def _item_write(request: Request, who: Principal, svc: Services, kind: str, key: str, fn, done: str) -> Response:
    error, _ = _attempt(svc, fn)
    if error is None:
        return RedirectResponse(f"/manage/{kind}/{key}?done={done}", status_code=303)
    with svc.engine.connect() as conn:
        return _item_page(request, who, conn, kind, key, error=error, status=409)


@router.post("/manage/{kind}/{key}")
async def manage_edit(*, request: Request, kind: str, key: str, who: Who,
                      svc: Annotated[Services, Depends(services)]) -> Response:
    from starlette.concurrency import run_in_threadpool

    form = dict(await request.form())
    _check_csrf(request, form.get("csrf", ""))
    kind = _kind(kind)
    return await run_in_threadpool(_item_write, request, who, svc, kind, key, lambda conn: edit_api.edit(
        conn, who=who, kind=kind, key=key, body=_body(kind, form, adding=False), now=svc.clock()), "edited")


@router.post("/manage/{kind}/{key}/retire")
async def manage_retire(*, request: Request, kind: str, key: str, who: Who,
                        svc: Annotated[Services, Depends(services)]) -> Response:
    from starlette.concurrency import run_in_threadpool

    form = dict(await request.form())
    _check_csrf(request, form.get("csrf", ""))
    kind = _kind(kind)
    body = edit_api.Retire(reason=str(form.get("reason", ""))[:500])
    return await run_in_threadpool(_item_write, request, who, svc, kind, key, lambda conn: edit_api.retire(
        conn, who=who, kind=kind, key=key, body=body, now=svc.clock()), "retired")

