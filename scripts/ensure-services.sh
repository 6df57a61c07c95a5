#!/usr/bin/env bash
# Make sure the services the tests use answer on loopback:
#   PostgreSQL on 127.0.0.1:5432 (trust auth, database "test"), Mosquitto on 127.0.0.1:1883, and pcscd with
#   farebox's two vsmartcard vpcd readers ("farebox vpcd 00 00" on TCP 0x9C40, "... 00 01" on 0x9C41);
#   and that Debian's chromium + chromedriver are installed for the web page tests.
# Installs them with apt-get when missing (root only), starts them when down, waits until each port
# answers, and prints one line per service. Idempotent; a few tens of milliseconds when all is up.
# When something is missing and we are not root, it says so and exits 0: the tests then skip with reasons.
set -euo pipefail

PG_HOST=127.0.0.1 PG_PORT=5432 PG_DB=test PG_USER=postgres
MQ_HOST=127.0.0.1 MQ_PORT=1883
WAIT_SECONDS=${ENSURE_SERVICES_TIMEOUT:-30}

is_root() { [[ $(id -u) -eq 0 ]]; }
say() { printf '%s\n' "$*"; }

# true when something accepts TCP connections on host:port (bash's /dev/tcp; refused is immediate on loopback)
answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() { # name host port
    local deadline=$((SECONDS + WAIT_SECONDS))
    until answers "$2" "$3"; do
        if ((SECONDS >= deadline)); then
            say "$1: DOWN - nothing answers on $2:$3 after ${WAIT_SECONDS}s"
            return 1
        fi
        sleep 0.1
    done
}

apt_install() { # packages...
    export DEBIAN_FRONTEND=noninteractive
    # no init system in containers: keep package scripts from trying to start services; we start them
    local policy=/usr/sbin/policy-rc.d created_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    local rc=0
    # another apt (a parallel make venv) may hold the dpkg lock: wait for it rather than fail
    local lock=(-o DPkg::Lock::Timeout=300)
    if ! apt-get install -y -q "${lock[@]}" "$@" >/tmp/ensure-services-apt.log 2>&1; then
        apt-get update -q "${lock[@]}" >>/tmp/ensure-services-apt.log 2>&1 || true
        apt-get install -y -q "${lock[@]}" "$@" >>/tmp/ensure-services-apt.log 2>&1 || rc=$?
    fi
    [[ -n $created_policy ]] && rm -f "$policy"
    if ((rc != 0)); then
        say "apt-get install $* failed (log: /tmp/ensure-services-apt.log):"
        tail -n 5 /tmp/ensure-services-apt.log
    fi
    return "$rc"
}

# ---------------------------------------------------------------- PostgreSQL
pg_trust_loopback() { # version: let 127.0.0.1 / ::1 in without a password, as on the project's machines
    local hba=/etc/postgresql/$1/main/pg_hba.conf
    if ! grep -q '^# farebox: trust loopback' "$hba"; then
        local tmp
        tmp=$(mktemp)
        {
            echo '# farebox: trust loopback (test machines only)'
            echo 'host    all    all    127.0.0.1/32    trust'
            echo 'host    all    all    ::1/128         trust'
            cat "$hba"
        } >"$tmp"
        cat "$tmp" >"$hba" && rm -f "$tmp"
    fi
}

pg_version() { # highest configured cluster version, or the highest installed server
    local dir d
    for dir in /etc/postgresql /usr/lib/postgresql; do
        [[ -d $dir ]] || continue
        d=$(find "$dir" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -V | tail -n 1)
        if [[ -n $d ]]; then
            printf '%s' "$d"
            return 0
        fi
    done
}

ensure_postgresql() {
    local fresh=
    if ! answers "$PG_HOST" "$PG_PORT"; then
        if ! command -v pg_ctlcluster >/dev/null || [[ -z $(pg_version) ]]; then
            if ! is_root; then
                say "postgresql: not installed, and not root so cannot install it - PostgreSQL tests will be skipped"
                return 0
            fi
            say "postgresql: installing (apt-get install postgresql) ..."
            apt_install postgresql || { say "postgresql: install failed - PostgreSQL tests will be skipped"; return 0; }
            fresh=1
        fi
        local ver
        ver=$(pg_version)
        if [[ ! -d /etc/postgresql/$ver/main ]]; then
            is_root || { say "postgresql: no cluster and not root - PostgreSQL tests will be skipped"; return 0; }
            pg_createcluster --port "$PG_PORT" "$ver" main >/dev/null
            fresh=1
        fi
        if [[ -n $fresh ]]; then
            pg_trust_loopback "$ver"
        fi
        if ! is_root && [[ $(id -un) != postgres ]]; then
            say "postgresql: down on $PG_HOST:$PG_PORT, and not root so cannot start it - PostgreSQL tests will be skipped"
            return 0
        fi
        pg_ctlcluster --skip-systemctl-redirect "$ver" main start ||
            { say "postgresql: start failed (see /var/log/postgresql/postgresql-$ver-main.log)"; return 0; }
        wait_for postgresql "$PG_HOST" "$PG_PORT" || return 0
    fi
    if command -v psql >/dev/null; then
        local psql=(psql -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -tA)
        local have errf
        errf=$(mktemp)
        # the server may accept TCP a moment before it accepts logins
        for _ in $(seq 1 50); do
            if have=$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" 2>"$errf"); then
                break
            fi
            have=ERR
            sleep 0.1
        done
        if [[ $have == ERR ]]; then
            say "postgresql: answers on $PG_HOST:$PG_PORT but user $PG_USER cannot log in: $(tail -n 1 "$errf")"
            rm -f "$errf"
            return 0
        fi
        rm -f "$errf"
        if [[ $have != 1 ]]; then
            "${psql[@]}" -c "CREATE DATABASE $PG_DB" >/dev/null
        fi
    fi
    say "postgresql: up ($PG_HOST:$PG_PORT, database $PG_DB)"
}

# ---------------------------------------------------------------- Mosquitto
ensure_mosquitto() {
    local conf=/etc/mosquitto/mosquitto.conf
    if ! answers "$MQ_HOST" "$MQ_PORT"; then
        if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
            if ! is_root; then
                say "mosquitto: not installed, and not root so cannot install it - Mosquitto tests will be skipped"
                return 0
            fi
            say "mosquitto: installing (apt-get install mosquitto) ..."
            apt_install mosquitto || { say "mosquitto: install failed - Mosquitto tests will be skipped"; return 0; }
            # Debian's stock config listens on loopback only (no listener line) and includes conf.d;
            # the default max_queued_messages (1000) silently drops QoS 1 messages for slow subscribers.
            if [[ -d /etc/mosquitto/conf.d ]] && grep -q '^include_dir /etc/mosquitto/conf.d' "$conf"; then
                printf '# farebox: never drop queued QoS 1 messages\nmax_queued_messages 0\n' \
                    >/etc/mosquitto/conf.d/farebox.conf
            fi
        fi
        if ! is_root; then
            say "mosquitto: down on $MQ_HOST:$MQ_PORT, and not root so cannot start it - Mosquitto tests will be skipped"
            return 0
        fi
        # what the systemd unit would do before starting it
        mkdir -p /run/mosquitto /var/log/mosquitto /var/lib/mosquitto
        if id mosquitto >/dev/null 2>&1; then
            chown mosquitto: /run/mosquitto /var/log/mosquitto /var/lib/mosquitto
        fi
        local mosquitto_bin
        mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
        "$mosquitto_bin" -d -c "$conf" ||
            { say "mosquitto: start failed (see /var/log/mosquitto/mosquitto.log)"; return 0; }
        wait_for mosquitto "$MQ_HOST" "$MQ_PORT" || return 0
    fi
    say "mosquitto: up ($MQ_HOST:$MQ_PORT)"
}

# ---------------------------------------------------------------- pcscd + vpcd
# The reader tests talk to a real pcscd through pyscard; hardware_sim/vpcd.py plugs simulated cards into its vpcd
# readers. pcscd has one socket per machine (/run/pcscd/pcscd.comm), so the one that runs must be one with farebox's
# readers: our config goes into /etc/reader.conf.d (so any pcscd started later, by systemd too, has them), and a
# pcscd that runs without them is restarted. opensc (opensc-tool) and pcsc-tools (scriptor) read the simulated card
# from outside; libpcsclite-dev is what pyscard compiles against.
#
# Only one reader entry may use the vpcd driver: libifdvpcd.so keeps its sockets in one global array indexed by
# slot number (Lun & 0xffff), so a second entry (Debian's own /etc/reader.conf.d/vpcd, "Virtual PCD" on 0x8C7B)
# takes over the first one's slots. pcscd then polls farebox's card from two readers at once, and their requests
# cross on the card's socket (seen as "vpcd sent 000104 while the answer to 04 was owed", or a card pcscd never
# powers). Other vpcd entries are therefore commented out, saying why, and pcscd is restarted without them.
PCSC_PKGS=(pcscd vsmartcard-vpcd libpcsclite-dev opensc pcsc-tools)
VPCD_LIB=/usr/lib/pcsc/drivers/serial/libifdvpcd.so
PCSC_CONF=/etc/reader.conf.d/farebox-vpcd
PCSC_LOG=/var/log/farebox-pcscd.log

pcsc_readers() { opensc-tool -l 2>/dev/null | grep -c 'farebox vpcd 00 0[01]' || true; }

# reader.conf.d files other than ours with an active LIBPATH line for the vpcd driver
vpcd_rivals() {
    grep -l -E "^[[:space:]]*LIBPATH[[:space:]]+$VPCD_LIB" /etc/reader.conf.d/* 2>/dev/null | grep -v -x "$PCSC_CONF" || true
}

# comment out every line of another vpcd entry, with a first line saying why (a dpkg conffile: kept on upgrade)
disable_vpcd_rivals() {
    local f
    for f in $(vpcd_rivals); do
        sed -i -e 's/^\([^#]\)/# \1/' -e '1i # disabled by farebox (scripts/ensure-services.sh): one pcscd can run only one vpcd reader entry' "$f"
        say "pcscd: disabled the other vpcd reader entry in $f (it shares the vpcd driver's slots with farebox's)"
    done
}

ensure_pcscd() {
    local missing=() p
    for p in "${PCSC_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        is_root || { say "pcscd: ${missing[*]} not installed, and not root - PC/SC reader tests will be skipped"; return 0; }
        say "pcscd: installing (apt-get install ${missing[*]}) ..."
        apt_install "${missing[@]}" || { say "pcscd: install failed - PC/SC reader tests will be skipped"; return 0; }
    fi
    [[ -e $VPCD_LIB ]] || { say "pcscd: $VPCD_LIB missing after install - PC/SC reader tests will be skipped"; return 0; }
    local rivals
    rivals=$(vpcd_rivals)
    if [[ -z $rivals && $(pcsc_readers) -ge 2 ]]; then
        say "pcscd: up (readers 'farebox vpcd 00 00' on port 40000, '00 01' on 40001)"
        return 0
    fi
    if ! is_root; then
        [[ -n $rivals ]] && say "pcscd: another vpcd reader entry ($rivals) shares farebox's vpcd slots, and not root - PC/SC reader tests will fail"
        say "pcscd: not running with farebox's vpcd readers alone, and not root - PC/SC reader tests will be skipped"
        return 0
    fi
    disable_vpcd_rivals
    cat >"$PCSC_CONF" <<'CONF'
# farebox: two virtual PC/SC readers for hardware_sim cards (hardware_sim/vpcd.py)
FRIENDLYNAME "farebox vpcd"
DEVICENAME   /dev/null:0x9C40
LIBPATH      /usr/lib/pcsc/drivers/serial/libifdvpcd.so
CHANNELID    0x9C40
CONF
    local pid
    pid=$(tr -dc '0-9' </run/pcscd/pcscd.pid 2>/dev/null || true) # the pid file ends in a NUL
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || pid=$(pidof pcscd || true)
    if [[ -n $pid ]]; then
        say "pcscd: running without farebox's vpcd readers alone (pid $pid): restarting it with them"
        kill $pid 2>/dev/null || true # pidof may give several
        for _ in $(seq 1 50); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    fi
    mkdir -p /run/pcscd
    # setsid: the daemon outlives make's process group; -f keeps its log in our file instead of a syslog we lack
    setsid nohup pcscd -f >"$PCSC_LOG" 2>&1 </dev/null &
    local deadline=$((SECONDS + WAIT_SECONDS))
    until [[ $(pcsc_readers) -ge 2 ]]; do
        if ((SECONDS >= deadline)); then
            say "pcscd: DOWN - farebox vpcd readers did not appear after ${WAIT_SECONDS}s (log: $PCSC_LOG)"
            tail -n 5 "$PCSC_LOG"
            return 0
        fi
        sleep 0.1
    done
    say "pcscd: up (readers 'farebox vpcd 00 00' on port 40000, '00 01' on 40001; log $PCSC_LOG)"
}

# ---------------------------------------------------------------- Chromium (web page tests)
# tests/e2e/test_web_pages.py drives Debian's chromium through chromedriver (selenium); the pages' Chinese labels
# need a CJK font, the shop's QR codes zbar. A file check when all is there, so repeat runs cost nothing.
ensure_chromium() {
    local missing=()
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    [[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
    [[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]] || missing+=(fonts-wqy-microhei)
    command -v zbarimg >/dev/null || missing+=(zbar-tools)  # test_web_shop decodes the shop's QR codes with zbar
    if ((${#missing[@]})); then
        is_root || { say "chromium: ${missing[*]} not installed, and not root - web page tests will be skipped"; return 0; }
        say "chromium: installing (apt-get install ${missing[*]}) ..."
        apt_install "${missing[@]}" || { say "chromium: install failed - web page tests will be skipped"; return 0; }
    fi
    say "chromium: ready ($(/usr/bin/chromium --version 2>/dev/null | head -n 1 || echo '?'))"
}

# ---------------------------------------------------------------- nats-server (tests/integration/test_nats_cluster.py)
# The test starts its own three nodes; only the program is needed, no running service.
ensure_nats() {
    [[ -x /usr/sbin/nats-server ]] || command -v nats-server >/dev/null && { say "nats-server: installed"; return 0; }
    is_root || { say "nats-server: not installed, and not root - NATS cluster tests will be skipped"; return 0; }
    apt_install nats-server || { say "nats-server: install failed - NATS cluster tests will be skipped"; return 0; }
    say "nats-server: installed"
}

ensure_postgresql
ensure_mosquitto
ensure_pcscd
ensure_chromium
ensure_nats
