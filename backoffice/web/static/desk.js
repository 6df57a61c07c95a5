// The desk reader in the counter pages: talks to the desk agent (`farebox desk`, farebox/desk.py) on this PC and,
// for a counter top-up, relays between it and the back office (backoffice/web/pages_cards.py).
// The agent's address and pairing code are kept in this browser's storage for this back office.
// Money: the amount typed in yuan is turned into integer fen by string arithmetic, never a float.
(function () {
  "use strict";
  var box = document.getElementById("desk");
  if (!box) { return; }
  var words = JSON.parse(box.getAttribute("data-words") || "{}");
  var csrf = box.getAttribute("data-csrf") || "";
  var pageAsn = (box.getAttribute("data-asn") || "").toLowerCase();
  var mode = box.getAttribute("data-mode") || "card";
  var KEY = "farebox-desk";
  var $ = function (id) { return document.getElementById(id); };

  function say(key, values, bad) {
    var text = words[key] || key;
    Object.keys(values || {}).forEach(function (k) { text = text.split("{" + k + "}").join(values[k]); });
    var p = $("desk-message");
    p.textContent = text;
    p.className = bad ? "error" : "note";
    p.setAttribute("data-state", key);
  }

  function yuan(fen) {
    var neg = fen < 0, f = Math.abs(fen), y = Math.floor(f / 100), c = f % 100;
    return (neg ? "-" : "") + "¥" + y.toLocaleString("en") + "." + (c < 10 ? "0" : "") + c;
  }

  function toFen(text) {  // "50" -> 5000, "20.5" -> 2050; null when it is not yuan with at most two decimals
    var m = /^\s*(\d{1,6})(?:\.(\d{1,2}))?\s*$/.exec(text || "");
    if (!m) { return null; }
    return parseInt(m[1], 10) * 100 + parseInt(((m[2] || "") + "00").slice(0, 2), 10);
  }

  function config() {
    try { return JSON.parse(localStorage.getItem(KEY) || "null"); } catch (e) { return null; }
  }

  function agent(path, body) {
    var c = config();
    if (!c) { return Promise.reject({key: "not_paired"}); }
    var opts = {method: body === undefined ? "GET" : "POST", headers: {"X-Desk-Pairing": c.code}, mode: "cors",
                credentials: "omit", cache: "no-store"};
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    return fetch(c.url.replace(/\/+$/, "") + path, opts).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (r.status === 401) { throw {key: "not_paired"}; }
        if (!r.ok) { throw {key: "failed", why: j.error || ("HTTP " + r.status)}; }
        return j;
      });
    }, function () { throw {key: "no_agent", url: c.url}; });
  }

  function backOffice(path, body) {
    return fetch(path, {method: "POST", credentials: "same-origin", cache: "no-store",
                        headers: {"Content-Type": "application/json", "X-CSRF": csrf},
                        body: JSON.stringify(body)}).then(function (r) {
      return r.json().catch(function () { return {detail: "HTTP " + r.status}; }).then(function (j) {
        if (!r.ok) {
          var d = j.detail;
          var why = d && d.message ? d.message : (Array.isArray(d) ? d.map(function (x) { return x.msg; }).join("; ")
                                                                  : String(d));
          throw {key: "failed", why: why};
        }
        return j;
      });
    });
  }

  function fail(e) {
    e = e || {};
    if (e.key === "not_paired") { showPairing(); }
    say(e.key || "failed", {why: e.why || String(e.message || e), url: e.url || ""}, true);
  }

  function showPairing() {
    var c = config();
    $("desk-pair").hidden = false;
    $("desk-read").hidden = true;
    if (c) { $("desk-url").value = c.url; }
  }

  function showCard(card) {
    $("desk-card").hidden = false;
    $("desk-asn").textContent = card.asn;
    $("desk-balance").textContent = yuan(card.balance);
    $("desk-counters").textContent = (words.counters || "{p} / {l}")
      .replace("{p}", card.purchase_ttc === null ? "-" : card.purchase_ttc)
      .replace("{l}", card.load_ttc === null ? "-" : card.load_ttc);
    box.setAttribute("data-read", card.asn);
  }

  function read() {
    say("reading");
    return agent("/card/read", {}).then(function (card) {
      showCard(card);
      if (mode === "lookup") {
        window.location.href = "/cards?asn=" + encodeURIComponent(card.asn);  // not known here: says so
      } else if (mode === "issue") {
        ["asn", "issuer", "card_type", "algorithm", "valid_from", "valid_to", "balance", "purchase_ttc",
         "load_ttc"].forEach(function (k) {
          var input = $("card-" + k.replace(/_/g, "-"));
          if (input) { input.value = card[k] === null ? "" : card[k]; }
        });
        $("issue-facts").hidden = false;
        $("issue-asn").textContent = card.asn;
        $("issue-balance").textContent = yuan(card.balance);
        $("issue-valid").textContent = card.valid_from + " – " + card.valid_to;
        $("issue-type").textContent = (words.types || {})[card.card_type] || card.card_type;
        say("issue_ready");
      } else if (pageAsn && card.asn !== pageAsn) {
        say("other_card", {asn: card.asn}, true);
      } else {
        if (mode === "order" && $("retry-ttc") && card.load_ttc !== null) { $("retry-ttc").value = card.load_ttc; }
        say(mode === "order" ? "order_read" : "read_done", {balance: yuan(card.balance), ttc: card.load_ttc});
      }
      return card;
    }).catch(fail);
  }

  function topUp(ev) {
    ev.preventDefault();
    var amount = toFen($("topup-amount").value);
    if (!amount) { say("bad_amount", {}, true); return; }
    var button = $("topup");
    button.disabled = true;
    say("loading");
    var held = false;
    agent("/load/prepare", {amount: amount}).then(function (prepared) {
      held = true;
      if (prepared.asn !== pageAsn) { throw {key: "wrong_card", why: prepared.asn}; }
      return backOffice("/cards/" + pageAsn + "/counter-loads", {
        amount: amount, terminal_id: prepared.terminal_id, init_answer: prepared.init_answer, log: prepared.log});
    }).then(function (grant) {
      return agent("/load/credit", {credit_apdu: grant.credit_apdu}).then(function (credited) {
        held = false;
        return backOffice("/cards/counter-loads/" + grant.load_id + "/tac", {tac: credited.tac});
      });
    }).then(function (done) {
      say("loaded", {amount: yuan(done.amount), balance: yuan(done.card_balance)});
      window.location.href = "/cards/" + pageAsn + "?done=" + encodeURIComponent("topup " + yuan(done.amount));
    }).catch(function (e) {
      if (held) { agent("/load/cancel", {}).catch(function () {}); }
      if (e && e.key === "wrong_card") { say("wrong_card", {asn: e.why}, true); } else { fail(e); }
      button.disabled = false;
    });
  }

  $("desk-pair").addEventListener("submit", function (ev) {
    ev.preventDefault();
    localStorage.setItem(KEY, JSON.stringify({url: $("desk-url").value.trim(), code: $("desk-code").value.trim()}));
    $("desk-code").value = "";
    start();
  });
  $("desk-unpair").addEventListener("click", function () { localStorage.removeItem(KEY); showPairing(); });
  $("desk-read").addEventListener("click", read);
  if ($("topup-form")) { $("topup-form").addEventListener("submit", topUp); }

  function start() {
    if (!config()) { showPairing(); say("not_paired"); return; }
    agent("/status").then(function (s) {
      $("desk-pair").hidden = true;
      $("desk-read").hidden = false;
      $("desk-unpair").hidden = false;
      if ($("topup")) { $("topup").disabled = false; }
      box.setAttribute("data-ready", "1");
      say("ready", {terminal: s.terminal_id});
    }).catch(fail);
  }
  start();
}());
