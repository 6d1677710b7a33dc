#!/usr/bin/env python3
"""The portcullis benchmark: start everything on loopback, load it with wrk, write RESULTS.md.

Run through bench/run.sh, which installs wrk, nginx and redis-server, builds portcullis and
raises the open-file limit first. Standard library only. Every load is bounded in time (wrk -d,
subprocess timeouts) and goes to 127.0.0.1 only.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import platform as pyplatform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LUA = os.path.join(HERE, "wrk", "load.lua")
# load.lua arguments of the portcullis loads: pass-through (scenario 3) and enforcing (4 and 5),
# the latter rotating over a file of tokens that carry a session id.
PASS_THROUGH_LOAD = ["mode=plain", "path=/open/state"]


def enforcing_load(tokens_file):
    return ["mode=proxy", "path=/game/state", f"file={tokens_file}"]
SECRET = "portcullis-bench-secret-0123456789abcdef-not-for-production"
KEY_PREFIX = "aeturnis"
API = "/api/v1/sessions"
# A realistic 120-byte mobile User-Agent.
USER_AGENT = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8 Pro Build/UQ1A.240205.004; wv) "
    "AppleWebKit/537.36 (KHTML, like Gecko) GameClient/3.2.17"
)
USER_AGENT = (USER_AGENT + " " * 120)[:120]
assert len(USER_AGENT.encode()) == 120
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Counts the session records under the keys matching ARGV[1] (see src/session/record.rs).
COUNT_RECORDS = """
local n = 0
for _, k in ipairs(redis.call('KEYS', ARGV[1])) do
  local v = redis.call('GET', k)
  local pos = 2
  while pos <= #v do
    local hi, lo = string.byte(v, pos, pos + 1)
    pos = pos + 2 + hi * 256 + lo
    n = n + 1
  end
end
return n
"""

SCENARIOS = {
    1: "direct (wrk -> upstream nginx)",
    2: "nginx proxy_pass, upstream keep-alive, no auth",
    3: "portcullis pass-through (auth = none)",
    4: "portcullis enforcing (JWT + session + sliding TTL + rate limit), defaults but the access log",
    5: "as 4 with `session.local_cache = false` (Redis on every request)",
    6: "hyper floor: the smallest hyper proxy, no checks (bench/hyper_floor.rs)",
    7: "raw floor: HTTP/1.1 relayed by hand on tokio, no hyper, no checks (hyper_floor --engine raw)",
}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Profiles: full and smoke run the same code with different sizes.
# ----------------------------------------------------------------------------------------------

FULL = dict(
    threads=2, connections=64, duration=10, rounds=3, warmup=2,
    paced_duration=10, paced_rounds=2,
    api_duration=5, api_connections=4,
    users=1000, sessions_per_user=3,
    mem_sessions=100_000, mem_sessions_per_user=(1, 2, 3),
    hold=10_000,
    stalled=100,
    perf_duration=5,
    criterion=True,
    pair_rounds=4, pair_duration=8, pair_warmup=3, pair_rate_open=10_000, pair_rate_enforced=8_000,
)
SMOKE = dict(
    threads=2, connections=16, duration=2, rounds=1, warmup=1,
    paced_duration=2, paced_rounds=1,
    api_duration=1, api_connections=2,
    users=50, sessions_per_user=2,
    mem_sessions=2_000, mem_sessions_per_user=(1, 2),
    hold=300,
    stalled=10,
    perf_duration=0,
    criterion=False,
    pair_rounds=1, pair_duration=2, pair_warmup=1, pair_rate_open=500, pair_rate_enforced=500,
)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(claims):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing = f"{header}.{payload}".encode()
    sig = hmac.new(SECRET.encode(), signing, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


def token(sub, sid=None, ttl=3 * 3600):
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + ttl}
    if sid:
        claims["sid"] = sid
    return jwt_hs256(claims)


def user_id(pool, i):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"portcullis-bench/{pool}/{i}"))


def device_id(i):
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"portcullis-bench/device/{i}"))


def proc_cpu_split(pids):
    """User and kernel CPU seconds of the processes."""
    user = kernel = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime (field 14)
            kernel += int(fields[12])  # stime (field 15)
        except FileNotFoundError:
            pass
    return user / CLK_TCK, kernel / CLK_TCK


def proc_cpu_seconds(pids):
    return sum(proc_cpu_split(pids))


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise Failure(f"no {key} for pid {pid}")


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def http_get(port, path, headers=None, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_http(port, path, want=200, timeout=20, what="server"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            status, _ = http_get(port, path, timeout=1)
            if status == want:
                return
            last = status
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise Failure(f"{what} on port {port} not ready ({last})")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

class Procs:
    """Every process the benchmark starts, stopped by pid at the end."""

    def __init__(self):
        self.procs = []

    def start(self, name, args, log_path, env=None, stop_signal=signal.SIGTERM):
        logf = open(log_path, "ab")
        p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env,
                             stdin=subprocess.DEVNULL)
        p.stop_signal = stop_signal
        self.procs.append((name, p))
        return p

    def stop(self, p, timeout=10):
        if p.poll() is None:
            p.send_signal(p.stop_signal)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop_all(self):
        for _, p in reversed(list(self.procs)):
            self.stop(p)


def nginx_early_log(d):
    """`-e` with nginx 1.19.5 and later (Debian 12's, not Debian 11's 1.18): the error log used
    before the config is read, so that nginx does not first try its compiled-in path."""
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    if m and tuple(map(int, m.groups())) >= (1, 19, 5):
        return ["-e", os.path.join(d, "error.log")]
    return []


def redis_cli(port, *args, timeout=60):
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise Failure(f"redis-cli {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def redis_info(port, section):
    info = {}
    for line in redis_cli(port, "INFO", section).splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.strip().split(":", 1)
            info[k] = v
    return info


def redis_commandstats(port):
    stats = {}
    for k, v in redis_info(port, "commandstats").items():
        if k.startswith("cmdstat_"):
            m = re.search(r"calls=(\d+)", v)
            stats[k[len("cmdstat_"):]] = int(m.group(1)) if m else 0
    return stats


NGINX_COMMON = """
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 65536;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 20000; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{body}
}}
"""

NGINX_UPSTREAM = """
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "ok";
        }}
        # A large download, for clients that stop reading it (the connection figures).
        location = /open/big {{
            default_type application/octet-stream;
            alias {big};
        }}
    }}
    # Counts every request the upstream answered: the exact number of proxied requests, which
    # wrk's total misses by the requests still in flight when it stops.
    server {{
        listen 127.0.0.1:{status};
        location / {{ stub_status; }}
    }}
"""

NGINX_PROXY = """
    upstream game {{
        server 127.0.0.1:{upstream};
        keepalive 256;
        # The http block's keepalive_requests is for clients; the upstream side has its own
        # (1000 by default), which would make nginx reconnect dozens of times a second.
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://game;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
"""

PORTCULLIS_CONFIG = """
# Written by bench/bench.py: plain HTTP, admin on its own port, limits high enough never to reject.
[server]
listen = "127.0.0.1:{port}"
header_read_timeout = "300s"
idle_timeout = "300s"
max_connections = 25000

[upstream]
url = "http://127.0.0.1:{upstream}"

[admin]
listen = "127.0.0.1:{admin}"

[log]
# Access log off (warn level), as nginx's is (access_log off): both measure proxying only.
level = "warn"

[redis]
url = "redis://127.0.0.1:{redis}"
key_prefix = "{prefix}"

[session]
ttl = "30d"
{session_extra}

[rate_limit.proxy]
requests = 1000000
per = "1s"
burst = 1000000

[rate_limit.sessions_api]
requests = 1000000
per = "1s"
burst = 1000000

[metrics]
# The periodic SCAN that counts live sessions would add Redis commands unrelated to requests.
active_sessions_interval = "1h"

[[routes]]
path_prefix = "/open"
auth = "none"
"""


class Bench:
    def __init__(self, args):
        self.args = args
        self.p = dict(SMOKE if args.smoke else FULL)
        self.smoke = args.smoke
        self.bin = args.bin
        self.dir = tempfile.mkdtemp(prefix="portcullis-bench-")
        os.chmod(self.dir, 0o755)
        self.procs = Procs()
        self.results = {"runs": [], "notes": []}
        self.problems = []
        self.ports = {k: free_port() for k in ("redis", "upstream", "status", "nginx", "portcullis",
                                               "admin", "portcullis5", "admin5", "floor", "raw",
                                               "portcullisB", "adminB")}
        self.floor_bin = args.floor
        self.portcullis = None
        self.portcullis5 = None
        self.portcullisB = None

    # -- setup ------------------------------------------------------------------------------

    def start_redis(self):
        d = os.path.join(self.dir, "redis")
        os.makedirs(d)
        self.redis = self.procs.start("redis", [
            "redis-server", "--port", str(self.ports["redis"]), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", d, "--maxclients", "1000",
        ], os.path.join(self.dir, "redis.log"))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if redis_cli(self.ports["redis"], "PING", timeout=2).strip() == "PONG":
                    return
            except (Failure, subprocess.TimeoutExpired):
                pass
            time.sleep(0.05)
        raise Failure("redis-server did not start")

    def start_nginx(self, name, body):
        d = os.path.join(self.dir, name)
        os.makedirs(d)
        os.chmod(d, 0o755)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_COMMON.format(workers=os.cpu_count() or 2, dir=d, body=body))
        return self.procs.start(name, ["nginx", "-p", d, *nginx_early_log(d), "-c", conf],
                                os.path.join(d, "stdout.log"))

    def start_portcullis(self, which="", binary=None):
        """Starts portcullis (defaults), or with which="5" the one without the local cache, or
        with which="B" `binary` (the baseline of a paired run) with the same configuration."""
        binary = binary or self.bin
        conf = os.path.join(self.dir, f"portcullis{which}.toml")
        with open(conf, "w") as f:
            f.write(PORTCULLIS_CONFIG.format(
                port=self.ports["portcullis" + which], upstream=self.ports["upstream"],
                admin=self.ports["admin" + which], redis=self.ports["redis"], prefix=KEY_PREFIX,
                session_extra="local_cache = false" if which == "5" else ""))
        env = dict(os.environ, JWT_SECRET=SECRET)
        env.pop("PORTCULLIS_LOG", None)
        check = subprocess.run([binary, "--config", conf, "check-config"], env=env,
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise Failure(f"bench config rejected: {check.stderr.strip()}")
        # SIGINT: stop at once (SIGTERM first waits out server.shutdown_delay).
        proc = self.procs.start("portcullis" + which, [binary, "--config", conf, "run"],
                                os.path.join(self.dir, f"portcullis{which}.log"), env=env,
                                stop_signal=signal.SIGINT)
        setattr(self, "portcullis" + which, proc)
        wait_http(self.ports["admin" + which], "/readyz", what="portcullis admin /readyz")
        wait_http(self.ports["portcullis" + which], "/open/ping", what="portcullis")

    def start_upstream(self):
        big = os.path.join(self.dir, "big.bin")
        with open(big, "wb") as f:
            f.write(b"x" * BIG_DOWNLOAD_BYTES)
        os.chmod(big, 0o644)
        self.upstream = self.start_nginx("upstream", NGINX_UPSTREAM.format(
            port=self.ports["upstream"], status=self.ports["status"], big=big))
        wait_http(self.ports["upstream"], "/", what="upstream nginx")

    def start_redis_and_upstream(self):
        self.start_redis()
        self.start_upstream()

    def nginx_pids(self):
        """The nginx proxy's master and workers."""
        return [self.nginx.pid] + children(self.nginx.pid)

    def restart_portcullis(self):
        if self.portcullis is not None:
            self.procs.stop(self.portcullis)
        self.start_portcullis()

    def setup(self):
        log(f"temp dir {self.dir}; ports {self.ports}")
        self.start_redis_and_upstream()
        self.nginx = self.start_nginx("nginx", NGINX_PROXY.format(port=self.ports["nginx"],
                                                                  upstream=self.ports["upstream"]))
        wait_http(self.ports["nginx"], "/", what="proxy nginx")
        self.start_portcullis()
        self.start_portcullis("5")
        self.start_floor()
        self.start_raw_floor()

    def start_floor(self, stop_signal=signal.SIGTERM):
        self.floor = self.procs.start("hyper_floor", [
            self.floor_bin, "--listen", f"127.0.0.1:{self.ports['floor']}",
            "--upstream", f"127.0.0.1:{self.ports['upstream']}",
        ], os.path.join(self.dir, "hyper_floor.log"), stop_signal=stop_signal)
        wait_http(self.ports["floor"], "/", what="hyper_floor")

    def start_raw_floor(self):
        self.raw = self.procs.start("raw_floor", [
            self.floor_bin, "--listen", f"127.0.0.1:{self.ports['raw']}",
            "--upstream", f"127.0.0.1:{self.ports['upstream']}", "--engine", "raw",
        ], os.path.join(self.dir, "raw_floor.log"))
        wait_http(self.ports["raw"], "/", what="raw floor")

    # -- sessions for scenario 4 and the API benches -----------------------------------------

    def create_sessions(self, pool, users, per_user, metadata=True, workers=4):
        """Creates `per_user` sessions for each of `users` users through the API. Returns
        [(user, token_without_sid, [sid, ...])]."""
        body = json.dumps({"metadata": {"platform": "android", "userAgent": USER_AGENT,
                                        "deviceId": device_id(0)}}).encode() if metadata else b""
        out = [None] * users
        errors = []

        def work(start):
            c = http.client.HTTPConnection("127.0.0.1", self.ports["portcullis"], timeout=10)
            try:
                for i in range(start, users, workers):
                    u = user_id(pool, i)
                    t = token(u)
                    sids = []
                    for _ in range(per_user):
                        c.request("POST", f"{API}/create", body=body, headers={
                            "Authorization": f"Bearer {t}", "Content-Type": "application/json"})
                        r = c.getresponse()
                        data = r.read()
                        if r.status != 201:
                            raise Failure(f"session create: {r.status} {data[:200]!r}")
                        sids.append(json.loads(data)["data"]["sessionId"])
                    out[i] = (u, t, sids)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                c.close()

        ts = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        if errors:
            raise Failure(f"creating sessions failed: {errors[0]}")
        return out

    def write_proxy_tokens(self, users, name):
        """Writes, one per line, a token carrying each user's first session id: what
        `enforcing_load` rotates over. Returns the file's path."""
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            for u, _, sids in users:
                f.write(token(u, sids[0]) + "\n")
        return path

    def prepare_tokens(self):
        p = self.p
        log(f"creating {p['users']} users x {p['sessions_per_user']} sessions through the API")
        t0 = time.time()
        self.users = self.create_sessions("players", p["users"], p["sessions_per_user"])
        log(f"  done in {time.time() - t0:.1f}s")
        self.proxy_tokens = self.write_proxy_tokens(self.users, "proxy-tokens.txt")
        self.api_tokens = os.path.join(self.dir, "api-tokens.txt")
        with open(self.api_tokens, "w") as f:
            for u, t, sids in self.users:
                f.write(f"{t} {sids[0]}\n")
        # Check scenario 4 end to end once: a token with its sid is let through.
        with open(self.proxy_tokens) as f:
            first = f.readline().strip()
        status, body = http_get(self.ports["portcullis"], "/game/state",
                                {"Authorization": f"Bearer {first}"})
        if status != 200 or body != b"ok":
            raise Failure(f"scenario 4 check: {status} {body[:200]!r}")
        status, body = http_get(self.ports["portcullis5"], "/game/state",
                                {"Authorization": f"Bearer {first}"})
        if status != 200 or body != b"ok":
            raise Failure(f"scenario 5 check: {status} {body[:200]!r}")
        status, _ = http_get(self.ports["portcullis"], "/game/state")
        if status != 401:
            raise Failure(f"scenario 4 without a token answered {status}, not 401")

    # -- wrk --------------------------------------------------------------------------------

    def wrk(self, port, duration, lua_args, connections=None, threads=None):
        p = self.p
        threads = threads or p["threads"]
        connections = connections or p["connections"]
        cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
               "--timeout", "5s", "--latency", "-s", LUA, f"http://127.0.0.1:{port}",
               "--", f"threads={threads}", *lua_args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        m = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.M)
        if out.returncode != 0 or not m:
            raise Failure(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
        r = json.loads(m.group(1))
        secs = r["duration_us"] / 1e6
        r["rps"] = r["requests"] / secs if secs > 0 else 0.0
        r["errors"] = (r["connect_errors"] + r["read_errors"] + r["write_errors"]
                       + r["status_errors"] + r["timeouts"])
        return r

    def upstream_requests(self):
        status, body = http_get(self.ports["status"], "/")
        m = re.search(rb"\n\s*\d+\s+\d+\s+(\d+)", body)
        if status != 200 or not m:
            raise Failure(f"upstream stub_status: {status} {body[:200]!r}")
        return int(m.group(1))

    def scenario_target(self, n):
        if n == 1:
            return self.ports["upstream"], ["mode=plain", "path=/game/state"]
        if n == 2:
            return self.ports["nginx"], ["mode=plain", "path=/game/state"]
        if n == 3:
            return self.ports["portcullis"], PASS_THROUGH_LOAD
        if n == 6:
            return self.ports["floor"], ["mode=plain", "path=/game/state"]
        if n == 7:
            return self.ports["raw"], ["mode=plain", "path=/game/state"]
        return (self.ports["portcullis" if n == 4 else "portcullis5"],
                enforcing_load(self.proxy_tokens))

    def redis_round_trips(self, which=""):
        """Redis operations portcullis made, by op, from its own /metrics (one per round trip,
        whatever the command: EVALSHA, a plain command or a pipeline)."""
        status, body = http_get(self.ports["admin" + which], "/metrics")
        if status != 200:
            return {}
        ops = {}
        for m in re.finditer(rb'^portcullis_redis_command_duration_seconds_count\{op="([^"]+)"\} (\d+)',
                             body, re.M):
            ops[m.group(1).decode()] = int(m.group(2))
        return ops

    def run_scenario(self, n, duration, extra=(), record=True, tag="max"):
        port, lua = self.scenario_target(n)
        which = "5" if n == 5 else ""
        # CPU of the proxy under test; for 6 and 7, of the floor.
        pc = {6: self.floor, 7: self.raw}.get(n, getattr(self, "portcullis" + which)).pid
        nginx_pids = self.nginx_pids()
        cpu_pc0 = proc_cpu_split([pc])
        cpu_ng0 = proc_cpu_split(nginx_pids)
        cmd0 = redis_commandstats(self.ports["redis"])
        up0 = self.upstream_requests()
        rt0 = self.redis_round_trips(which) if n < 6 else {}
        r = self.wrk(port, duration, lua + list(extra))
        time.sleep(0.2)  # let the requests still in flight when wrk stopped finish
        up1 = self.upstream_requests()
        rt1 = self.redis_round_trips(which) if n < 6 else {}
        r["round_trips"] = {k: v - rt0.get(k, 0) for k, v in rt1.items() if v - rt0.get(k, 0)}
        cmd1 = redis_commandstats(self.ports["redis"])
        # Requests the upstream answered in this run (the status read itself counts one).
        r["served"] = up1 - up0 - 1
        cpu_pc = [b - a for a, b in zip(cpu_pc0, proc_cpu_split([pc]))]
        cpu_ng = [b - a for a, b in zip(cpu_ng0, proc_cpu_split(nginx_pids))]
        r["portcullis_user_s"], r["portcullis_kernel_s"] = cpu_pc
        r["nginx_user_s"], r["nginx_kernel_s"] = cpu_ng
        r["portcullis_cpu_s"] = sum(cpu_pc)
        r["nginx_cpu_s"] = sum(cpu_ng)
        delta = {k: cmd1.get(k, 0) - cmd0.get(k, 0) for k in cmd1}
        delta = {k: v for k, v in delta.items() if v and not k.startswith("info")}
        r["redis_client_cmds"] = delta.get("evalsha", 0) + delta.get("eval", 0)
        r["redis_all_cmds"] = sum(delta.values())
        r["redis_cmds"] = delta
        r["scenario"] = n
        r["tag"] = tag
        if r["errors"] or r["requests"] == 0:
            self.problems.append(f"scenario {n} ({tag}): {r['requests']} requests, "
                                 f"{r['status_errors']} non-2xx, {r['errors']} errors in all")
        if record:
            self.results["runs"].append(r)
        log(f"  scenario {n} {tag}: {r['rps']:.0f} req/s p50 {r['p50_us']}us "
            f"p99 {r['p99_us']}us p99.9 {r['p999_us']}us errors {r['errors']}")
        return r

    def throughput(self):
        p = self.p
        log("warm-up")
        for n in SCENARIOS:
            self.run_scenario(n, p["warmup"], record=False, tag="warm-up")
        orders = [(1, 2, 3, 4, 5, 6, 7), (7, 6, 5, 4, 3, 2, 1), (2, 4, 6, 1, 7, 5, 3),
                  (3, 7, 6, 5, 1, 4, 2)]
        for rnd in range(p["rounds"]):
            order = orders[rnd % len(orders)]
            log(f"round {rnd + 1}/{p['rounds']}: order {order}")
            for n in order:
                self.run_scenario(n, p["duration"])
        self.results["peak_rss_kib"] = proc_status_kib(self.portcullis.pid, "VmHWM")
        self.results["peak_rss5_kib"] = proc_status_kib(self.portcullis5.pid, "VmHWM")

    def paced(self):
        p = self.p
        s4 = [r["rps"] for r in self.results["runs"] if r["scenario"] == 4 and r["tag"] == "max"]
        rate = max(100, int(median(s4) / 2))
        self.results["paced_rate"] = rate
        log(f"fixed rate {rate} req/s (half of scenario 4's median maximum)")
        for rnd in range(p["paced_rounds"]):
            # Scenarios 2 and 6 too: what nginx and the bare HTTP engine add at this rate on this
            # machine, for reference.
            for n in ((1, 4, 2, 6, 7) if rnd % 2 == 0 else (7, 6, 2, 4, 1)):
                r = self.run_scenario(n, p["paced_duration"], [f"rate={rate}"], tag="paced")
                if abs(r["rps"] - rate) > 0.1 * rate:
                    self.results["notes"].append(
                        f"paced run of scenario {n} reached {r['rps']:.0f} req/s, not {rate}")
                if r["restarts"] or r["late_slots"] > 0.001 * r["requests"]:
                    self.results["notes"].append(
                        f"paced run of scenario {n}: {r['late_slots']} requests were issued more "
                        f"than 2 ms after their slot (worst {r['worst_late_ms']:.1f} ms) and the "
                        f"schedule restarted {r['restarts']} times; its percentiles leave that "
                        "wait out")

    def perf_stat(self):
        """Instructions and context switches per request for scenarios 3 and 4 (perf stat on
        the portcullis process during a flat-out run), when perf can count here."""
        if not self.p["perf_duration"] or not shutil.which("perf"):
            return
        out = {}
        for n in (3, 4):
            path = os.path.join(self.dir, f"perf-{n}.txt")
            perf = subprocess.Popen(
                ["perf", "stat", "-x", ",", "-o", path, "-e",
                 "task-clock,context-switches,cpu-migrations,instructions,cycles",
                 "-p", str(self.portcullis.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.2)
            r = self.run_scenario(n, self.p["perf_duration"], record=False, tag="perf")
            perf.send_signal(signal.SIGINT)
            try:
                perf.wait(10)
            except subprocess.TimeoutExpired:
                perf.kill()
                perf.wait()
            counts = {}
            try:
                with open(path) as f:
                    for line in f:
                        parts = line.strip().split(",")
                        if len(parts) > 2 and parts[0] and parts[0][0].isdigit():
                            counts[parts[2]] = float(parts[0])
            except FileNotFoundError:
                pass
            req = max(1, r["served"])
            out[n] = {k: v / req for k, v in counts.items()}
        self.results["perf"] = out

    # -- session API ------------------------------------------------------------------------

    def api_latency(self):
        p = self.p
        body = os.path.join(self.dir, "create-body.json")
        with open(body, "w") as f:
            json.dump({"metadata": {"platform": "android", "userAgent": USER_AGENT,
                                    "deviceId": device_id(1)}}, f)
        # Creates go to a separate pool of users so the players' session lists stay small.
        creators = os.path.join(self.dir, "creator-tokens.txt")
        with open(creators, "w") as f:
            for i in range(max(p["users"], 100) * 10):
                f.write(token(user_id("creators", i)) + "\n")
        api = {}
        port = self.ports["portcullis"]
        for mode, file in (("create", creators), ("get", self.api_tokens), ("list", self.api_tokens)):
            r = self.wrk(port, p["api_duration"], [f"mode={mode}", f"file={file}", f"body={body}"],
                         connections=p["api_connections"], threads=1)
            if r["errors"] or r["requests"] == 0:
                self.problems.append(f"session API {mode}: {r['requests']} requests, "
                                     f"{r['errors']} errors")
            api[mode] = r
            log(f"  API {mode}: {r['rps']:.0f} req/s p50 {r['p50_us']}us p99 {r['p99_us']}us")
        self.results["api"] = api
        self.results["api_sessions_per_user"] = p["sessions_per_user"]

    def session_memory(self):
        self.results["memory"] = [self.session_memory_with(per_user)
                                  for per_user in self.p["mem_sessions_per_user"]]

    def session_memory_with(self, per_user):
        """used_memory growth over mem_sessions sessions created through the API, each user
        holding `per_user` of them."""
        p = self.p
        n = p["mem_sessions"]
        users = n // per_user
        port = self.ports["redis"]
        redis_cli(port, "FLUSHALL")
        time.sleep(0.2)
        before = int(redis_info(port, "memory")["used_memory"])
        toks = os.path.join(self.dir, "memory-tokens.txt")
        with open(toks, "w") as f:
            for i in range(users):
                f.write(token(user_id(f"memory-{per_user}", i)) + "\n")
        body = os.path.join(self.dir, "memory-body.json")
        with open(body, "w") as f:
            json.dump({"metadata": {"platform": "android", "userAgent": USER_AGENT,
                                    "deviceId": device_id(2)}}, f)
        create_rate = self.results.get("api", {}).get("create", {}).get("rps", 1000) or 1000
        duration = int(min(120, max(3, n / create_rate * 1.3 + 2)))
        # Each wrk thread stops sending after its share, but wrk itself runs the whole -d.
        log(f"creating {n} sessions for {users} users through the API (in {duration}s)")
        threads = self.p["threads"]
        self.wrk(self.ports["portcullis"], duration,
                 ["mode=create", f"file={toks}", f"body={body}", f"stop={n}"],
                 connections=32, threads=threads)
        time.sleep(0.5)
        after = int(redis_info(port, "memory")["used_memory"])
        keys = redis_cli(port, "--scan", "--pattern", f"{KEY_PREFIX}:sessions:*").split()
        if not keys:
            raise Failure("no session was created")
        # Records per key, read in Redis (the value is binary): version byte, then
        # length-prefixed records.
        sessions = int(redis_cli(port, "EVAL", COUNT_RECORDS, "0", f"{KEY_PREFIX}:sessions:*"))
        sample = keys[:20]
        usage = [int(redis_cli(port, "MEMORY", "USAGE", k, "SAMPLES", "0").strip())
                 for k in sample]
        value_len = [int(redis_cli(port, "STRLEN", k).strip()) for k in sample]
        m = {
            "per_user": per_user, "sessions": sessions, "users": len(keys), "requested": n,
            "used_memory_delta": after - before,
            "per_session": (after - before) / sessions,
            "memory_usage_avg": sum(usage) / len(usage),
            "key_len": len(keys[0]), "value_len_avg": sum(value_len) / len(value_len),
        }
        if sessions < 0.9 * n:
            self.results["notes"].append(
                f"only {sessions} of {n} sessions were created within {duration}s")
        log(f"  {per_user} per user: {sessions} sessions, used_memory +{m['used_memory_delta']} B, "
            f"{m['per_session']:.0f} B/session; MEMORY USAGE of a user's key {m['memory_usage_avg']:.0f} B")
        return m

    # -- connections ------------------------------------------------------------------------

    def connections(self):
        n = self.p["hold"]
        log("restarting portcullis for the connection figures")
        self.restart_portcullis()
        time.sleep(1.0)
        pid = self.portcullis.pid
        idle = proc_status_kib(pid, "VmRSS")
        status, _ = http_get(self.ports["portcullis"], "/open/warm")
        if status != 200:
            raise Failure(f"/open/warm answered {status}")
        idle_after_one = proc_status_kib(pid, "VmRSS")
        log(f"opening {n} keep-alive connections, one request each, then holding them")
        held, opened_s = hold_connections(self.ports["portcullis"], n, pid)
        self.results["connections"] = {
            "idle_rss_kib": idle, "idle_after_one_request_kib": idle_after_one,
            "held": n, "held_ok": held["ok"], "held_rss_kib": held["rss_kib"],
            "open_seconds": opened_s,
            "per_connection_b": (held["rss_kib"] - idle_after_one) * 1024 / max(1, held["ok"]),
            "after_close_rss_kib": proc_status_kib(pid, "VmRSS"),
            "hwm_kib": proc_status_kib(pid, "VmHWM"),
        }
        if held["ok"] < n:
            self.problems.append(f"only {held['ok']} of {n} connections answered")
        log(f"  idle {idle / 1024:.1f} MiB; {held['ok']} held: {held['rss_kib'] / 1024:.1f} MiB")
        stalled = self.p["stalled"]
        log(f"{stalled} clients each starting a {BIG_DOWNLOAD_BYTES >> 20} MiB download, then reading none of it")
        self.restart_portcullis()
        time.sleep(1.0)
        pid = self.portcullis.pid
        before = proc_status_kib(pid, "VmRSS")
        during = stalled_downloads(self.ports["portcullis"], stalled, pid)
        self.results["connections"].update({
            "stalled": stalled, "stalled_rss_kib": during,
            "per_stalled_kib": (during - before) / max(1, stalled),
        })
        log(f"  {before / 1024:.1f} MiB before, {during / 1024:.1f} MiB with them")

    # -- criterion --------------------------------------------------------------------------

    def criterion(self):
        if not self.p["criterion"] or self.args.no_criterion:
            return
        log("criterion micro-benchmarks (cargo bench --bench gate)")
        out = subprocess.run(
            ["cargo", "bench", "--locked", "--bench", "gate", "--", "--warm-up-time", "1",
             "--measurement-time", "2", "--sample-size", "50"],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            self.problems.append("criterion benches failed: " + out.stderr[-400:])
            return
        self.results["criterion"] = parse_criterion(out.stdout)

    # -- paired: two binaries under the same load at the same time ----------------------------

    def load_together(self, sides, rate, duration, first=None):
        """Loads every side at once, each at `rate` (wrk, 1 thread, 32 connections). `sides`
        maps a name to (port, wrk load arguments, a function giving the pids whose CPU counts);
        the `first` side's load starts first. Returns each side's wrk result with `cpu_us`, its
        CPU per request answered."""
        before = {name: proc_cpu_seconds(pids()) for name, (_, _, pids) in sides.items()}
        results = {}

        def load(name, port, lua):
            results[name] = self.wrk(port, duration, [*lua, f"rate={rate}"], connections=32,
                                     threads=1)

        order = sorted(sides.items(), key=lambda kv: kv[0] != first)
        ts = [threading.Thread(target=load, args=(name, port, lua))
              for name, (port, lua, _) in order]
        for t in ts:
            t.start()
        for t in ts:
            t.join(duration + 90)
        for name, (_, _, pids) in sides.items():
            r = results.get(name)
            if r is None:
                raise Failure(f"simultaneous load: {name}'s load did not finish")
            if r["errors"] or r["requests"] == 0:
                raise Failure(f"simultaneous load, {name}: {r['errors']} errors of "
                              f"{r['requests']} requests")
            r["cpu_us"] = (proc_cpu_seconds(pids()) - before[name]) * 1e6 / r["requests"]
        return results

    def paired(self):
        """CPU per request of the binary under test against a baseline binary, both started with
        the same configuration and loaded at the same fixed rate at the same time, so that the
        machine's changes of speed hit both alike. Returns the markdown report."""
        p = self.p
        log(f"temp dir {self.dir}; ports {self.ports}")
        self.start_redis_and_upstream()
        self.start_portcullis()
        self.start_portcullis("B", binary=self.args.against)
        # Sessions live in the shared Redis under the same prefix: valid through either binary.
        users = self.create_sessions("players", p["users"], 1)
        tokens = self.write_proxy_tokens(users, "pair-tokens.txt")
        loads = (
            ("pass-through (3)", p["pair_rate_open"], PASS_THROUGH_LOAD),
            ("enforcing (4)", p["pair_rate_enforced"], enforcing_load(tokens)),
        )
        rows = []
        for name, rate, lua in loads:
            sides = {"current": (self.ports["portcullis"], lua, lambda: [self.portcullis.pid]),
                     "baseline": (self.ports["portcullisB"], lua,
                                  lambda: [self.portcullisB.pid])}
            # Unmeasured: both warm up alike (only one of them served the session creates).
            self.load_together(sides, rate, p["pair_warmup"], "baseline")
            for rnd in range(p["pair_rounds"]):
                results = self.load_together(sides, rate, p["pair_duration"],
                                             "current" if rnd % 2 else "baseline")
                row = {"scenario": name, "round": rnd + 1, "rate": rate}
                for side, r in results.items():
                    row[side] = {"us": r["cpu_us"], "p99": r["p99_us"], "rps": r["rps"]}
                rows.append(row)
                log(f"  {name} round {rnd + 1}: current {row['current']['us']:.1f} us/req, "
                    f"baseline {row['baseline']['us']:.1f} us/req")
        return render_paired(self, rows)

    def references(self):
        """CPU per request of portcullis (pass-through, then enforcing), the nginx proxy and the
        hyper floor, all three loaded at the same fixed rate at the same time: their ratios do
        not depend on how fast the machine happens to be during one scenario's run, which
        moves the requests/s ratios by 10% and more between runs."""
        p = self.p
        rate = p["pair_rate_enforced"]
        references = {
            "nginx": (self.ports["nginx"], self.scenario_target(2)[1], self.nginx_pids),
            "floor": (self.ports["floor"], self.scenario_target(6)[1], lambda: [self.floor.pid]),
        }
        log(f"portcullis, nginx and the floor loaded together at {rate} req/s each")
        rows = []
        for n in (3, 4):
            sides = dict(references, portcullis=(*self.scenario_target(n),
                                                 lambda: [self.portcullis.pid]))
            names = list(sides)
            self.load_together(sides, rate, p["pair_warmup"])
            for rnd in range(p["pair_rounds"]):
                # Each side starts first in turn.
                results = self.load_together(sides, rate, p["pair_duration"],
                                             names[rnd % len(names)])
                rows.append({"scenario": n, "round": rnd + 1,
                             **{k: r["cpu_us"] for k, r in results.items()}})
                log(f"  scenario {n} round {rnd + 1}: " + ", ".join(
                    f"{k} {r['cpu_us']:.1f} us/req" for k, r in results.items()))
        self.results["references"] = {"rate": rate, "rows": rows}

    # -- training run for profile-guided optimisation (bench/pgo.sh) ------------------------

    def train(self):
        """Drives --bin through what the benchmark measures (session creates, pass-through,
        enforcing), then stops it with SIGINT, so that an instrumented build writes its
        profile on the way out."""
        secs = self.args.train
        log(f"training {self.bin}: {secs} s per load")
        self.start_redis_and_upstream()
        self.start_portcullis()
        users = self.create_sessions("players", min(self.p["users"], 200), 1)
        tokens = self.write_proxy_tokens(users, "train-tokens.txt")
        for lua in (PASS_THROUGH_LOAD, enforcing_load(tokens)):
            r = self.wrk(self.ports["portcullis"], secs, lua)
            if r["errors"] or r["requests"] == 0:
                raise Failure(f"training load {lua[0]}: {r['errors']} errors of "
                              f"{r['requests']} requests")
        self.procs.stop(self.portcullis)
        if self.portcullis.returncode not in (0, -signal.SIGINT):
            raise Failure(f"portcullis exited with {self.portcullis.returncode} after training")

    def train_floor(self):
        """Drives --floor through the pass-through load (all it does), then stops it with
        SIGINT, on which it exits so that an instrumented build writes its profile."""
        secs = self.args.train
        log(f"training {self.floor_bin}: {secs} s of pass-through load")
        self.start_upstream()
        self.start_floor(stop_signal=signal.SIGINT)
        r = self.wrk(self.ports["floor"], secs, PASS_THROUGH_LOAD)
        if r["errors"] or r["requests"] == 0:
            raise Failure(f"floor training load: {r['errors']} errors of {r['requests']} "
                          f"requests")
        self.procs.stop(self.floor)
        if self.floor.returncode != 0:
            raise Failure(f"hyper_floor exited with {self.floor.returncode} after training")

    # -- all --------------------------------------------------------------------------------

    def run(self):
        if self.args.train:
            try:
                if self.bin:
                    self.train()
                else:
                    self.train_floor()
            finally:
                self.procs.stop_all()
            if not self.args.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            return 0
        if self.args.against:
            try:
                report = self.paired()
            finally:
                self.procs.stop_all()
            if self.args.out:
                with open(self.args.out, "w") as f:
                    f.write(report)
                log(f"wrote {self.args.out}")
            print(report)
            if not self.args.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            return 0
        started = time.time()
        cut_short = None
        try:
            self.setup()
            self.prepare_tokens()
            self.throughput()
            self.paced()
            self.perf_stat()
            self.references()
            self.procs.stop(self.portcullis5)
            self.api_latency()
            self.session_memory()
            self.connections()
        except Exception as e:
            # What was measured before is still worth a report (a slow machine may run out
            # of the time budget in the last steps).
            cut_short = e
            self.problems.append(f"the run was cut short ({e!r}): later sections are missing")
        finally:
            # A second TERM must not cut the clean-up short in turn.
            on_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.procs.stop_all()
            signal.signal(signal.SIGTERM, on_term)
        if cut_short is None:
            try:
                self.criterion()
            except Failure as e:
                cut_short = e
                self.problems.append(f"the run was cut short ({e!r}) during criterion")
        # Nor the report.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.results["elapsed_s"] = time.time() - started
        try:
            report = render(self)
        except Exception as e:  # a section left half-measured
            if cut_short is not None:
                raise cut_short from e
            raise
        if self.args.out:
            with open(self.args.out, "w") as f:
                f.write(report)
            log(f"wrote {self.args.out}")
        print(report)
        if cut_short is not None:
            raise cut_short
        if self.problems:
            for p in self.problems:
                log(f"PROBLEM: {p}")
            return 1
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return 0


BIG_DOWNLOAD_BYTES = 20 * 1024 * 1024


def stalled_downloads(port, n, pid, settle=3.0):
    """Opens n connections that each ask for the large download and then read nothing (a
    4 KiB receive buffer), waits for the transfers to stall, and gives portcullis' RSS then."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            socks.append(s)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /open/big HTTP/1.1\r\nHost: bench\r\n\r\n")
        time.sleep(settle)
        rss = proc_status_kib(pid, "VmRSS")
        # A refusal would make a flattering figure: the downloads must really be under way.
        socks[0].settimeout(5)
        head = socks[0].recv(64)
        if not head.startswith(b"HTTP/1.1 200"):
            raise Failure(f"/open/big answered {head[:40]!r}")
        return rss
    finally:
        for s in socks:
            s.close()
        time.sleep(0.5)


def hold_connections(port, n, pid, batch=256):
    """Opens n connections, sends one keep-alive request on each, reads each answer, then holds
    them all open while portcullis's RSS is read. Non-blocking sockets and one selector."""
    import selectors
    sel = selectors.DefaultSelector()
    req = b"GET /open/held HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks = []
    ok = 0
    t0 = time.time()
    deadline = t0 + 120
    pending = {}
    i = 0
    while (i < n or pending) and time.time() < deadline:
        while i < n and len(pending) < batch:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_WRITE, b"")
            pending[s] = b""
            socks.append(s)
            i += 1
        for key, mask in sel.select(timeout=1):
            s = key.fileobj
            if mask & selectors.EVENT_WRITE:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    sel.unregister(s)
                    pending.pop(s, None)
                    continue
                s.send(req)
                sel.modify(s, selectors.EVENT_READ, b"")
            else:
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                buf = pending.get(s, b"") + data
                if not data or (b"\r\n\r\n" in buf and buf.endswith(b"ok")):
                    if buf.startswith(b"HTTP/1.1 200"):
                        ok += 1
                    sel.unregister(s)
                    pending.pop(s, None)
                else:
                    pending[s] = buf
    opened = time.time() - t0
    time.sleep(2.0)
    rss = proc_status_kib(pid, "VmRSS")
    # Are they all still open? A closed one reads EOF at once.
    alive = 0
    for s in socks:
        try:
            if s.recv(1) == b"":
                continue
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    for s in socks:
        s.close()
    time.sleep(1.0)
    return {"ok": min(ok, alive), "rss_kib": rss}, opened


def parse_criterion(text):
    out = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^(\S+/\S+)\s+time:\s+\[(.+?)\]", line)
        if m:
            out[m.group(1)] = m.group(2).split()[2:4]
            continue
        m = re.match(r"^(\S+/\S+)\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.match(r"^\s+time:\s+\[(.+?)\]", line)
        if m and name:
            out[name] = m.group(1).split()[2:4]
            name = None
    return {k: " ".join(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pyplatform.processor() or "unknown"


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout
        return rev + (" (with uncommitted changes in src/)" if dirty.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def ms(us):
    return f"{us / 1000:.2f}"


def render(b):
    R = b.results
    p = b.p
    runs = [r for r in R["runs"] if r["tag"] == "max"]
    by = {n: [r for r in runs if r["scenario"] == n] for n in SCENARIOS}
    med = {n: {k: median([r[k] for r in rs]) for k in ("rps", "p50_us", "p99_us", "p999_us")}
           for n, rs in by.items() if rs}
    L = []
    w = L.append
    mode = "smoke (sizes too small to mean anything)" if b.smoke else "full"
    w("# portcullis benchmark results")
    w("")
    w(f"Generated by `bench/run.sh{' --smoke' if b.smoke else ''}` ({mode}) on "
      f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
      f"commit {git_rev()}, profile `{b.args.profile}`.")
    w("")
    w(f"Machine: {os.cpu_count()} cores (nproc), {cpu_model()}, Linux {pyplatform.release()}. "
      "**Measured on a shared virtual machine whose speed varies between runs: absolute "
      "figures are noisy; the ratios, taken from runs interleaved in alternating order, are "
      f"what to read.** wrk, nginx, Redis and portcullis all share the same {os.cpu_count()} "
      "cores.")
    w("")
    w(f"Load: wrk {p['threads']} threads, {p['connections']} keep-alive connections, "
      f"{p['duration']} s per run, {p['rounds']} rounds in alternating order (medians shown), "
      "after a warm-up run of each. Upstream: nginx answering `200 ok` (2 bytes) on its own "
      "port. Access logs off in nginx and portcullis (log level warn).")
    w("")
    w("What changed between runs, with the figures before and after: bench/HISTORY.md.")
    w("")
    w("## Throughput and latency")
    w("")
    w("| # | scenario | requests/s | p50 ms | p99 ms | p99.9 ms | runs (req/s) |")
    w("|---|---|---:|---:|---:|---:|---|")
    for n, name in SCENARIOS.items():
        if n not in med:
            continue
        m = med[n]
        each = ", ".join(f"{r['rps']:.0f}" for r in by[n])
        w(f"| {n} | {name} | {m['rps']:.0f} | {ms(m['p50_us'])} | {ms(m['p99_us'])} | "
          f"{ms(m['p999_us'])} | {each} |")
    w("")
    ratio = lambda a, c: med[a]["rps"] / med[c]["rps"] if a in med and c in med and med[c]["rps"] else float("nan")  # noqa: E731
    r42, r32, r41 = ratio(4, 2), ratio(3, 2), ratio(4, 1)
    w(f"Ratios of requests/s: **4/2 = {r42:.2f}**, **3/2 = {r32:.2f}**, 4/1 = {r41:.2f}; "
      f"without the local session cache 5/2 = {ratio(5, 2):.2f}.")
    w("")
    w(f"Against the hyper floor (6), the smallest proxy on hyper and tokio (portcullis serves "
      f"HTTP/1.1 with its own engine on tokio, and builds the same `http` request and response "
      f"types hyper does): "
      f"6/2 = {ratio(6, 2):.2f}, **3/6 = {ratio(3, 6):.2f}**, **4/6 = {ratio(4, 6):.2f}**.")
    w("")
    w(f"The raw floor (7), HTTP/1.1 relayed by hand with no HTTP engine and no checks, is about "
      f"the most any proxy on tokio reaches here: **7/2 = {ratio(7, 2):.2f}**, 7/6 = {ratio(7, 6):.2f}, "
      f"3/7 = {ratio(3, 7):.2f}, 4/7 = {ratio(4, 7):.2f}.")
    w("")

    paced = [r for r in R["runs"] if r["tag"] == "paced"]
    p1 = [r for r in paced if r["scenario"] == 1]
    p4 = [r for r in paced if r["scenario"] == 4]
    added99 = median([r["p99_us"] for r in p4]) - median([r["p99_us"] for r in p1]) if p1 and p4 else float("nan")
    added50 = median([r["p50_us"] for r in p4]) - median([r["p50_us"] for r in p1]) if p1 and p4 else float("nan")
    p2 = [r for r in paced if r["scenario"] == 2]
    nginx99 = median([r["p99_us"] for r in p2]) - median([r["p99_us"] for r in p1]) if p1 and p2 else float("nan")
    p6 = [r for r in paced if r["scenario"] == 6]
    floor99 = median([r["p99_us"] for r in p6]) - median([r["p99_us"] for r in p1]) if p1 and p6 else float("nan")
    p7 = [r for r in paced if r["scenario"] == 7]
    raw99 = median([r["p99_us"] for r in p7]) - median([r["p99_us"] for r in p1]) if p1 and p7 else float("nan")
    w("## Added latency at a fixed rate")
    w("")
    w(f"Constant rate of {R.get('paced_rate', 0)} requests/s (half of scenario 4's maximum), "
      f"{p['paced_duration']} s per run, {p['paced_rounds']} round(s) alternating 1,4,2,6,7 / 7,6,2,4,1 "
      "(scenarios 2, nginx, and 6 and 7, the floors, as the references for what a proxy adds on "
      "this machine). "
      "Tool: wrk with the pacing `delay()` in bench/wrk/load.lua (wrk2 is not in Debian; "
      "`vegeta` is not packaged for bookworm). Each thread claims send slots on a fixed "
      "schedule (monotonic clock via LuaJIT FFI, 1 ms timer resolution); latency is measured "
      "from the actual send, so it is service time without coordinated-omission correction "
      "(fine at half load, where queues are short; the last two columns count the requests "
      "that went out late, whose wait is left out).")
    w("")
    w("| # | achieved req/s | p50 ms | p99 ms | p99.9 ms | issued > 2 ms late (worst ms) | "
      "schedule restarts |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for r in paced:
        w(f"| {r['scenario']} | {r['rps']:.0f} | {ms(r['p50_us'])} | {ms(r['p99_us'])} | "
          f"{ms(r['p999_us'])} | {r['late_slots']} ({r['worst_late_ms']:.1f}) | "
          f"{r['restarts']} |")
    w("")
    w(f"**p99 added latency, 4 over 1: {ms(added99)} ms** (p50 added: {ms(added50)} ms); "
      f"nginx (2 over 1) adds {ms(nginx99)} ms at p99, the hyper floor (6 over 1) {ms(floor99)} ms, "
      f"the raw floor (7 over 1) {ms(raw99)} ms.")
    w("")

    s3 = by.get(3, [])

    def redis_costs(rs):
        served = sum(r["served"] for r in rs)
        if not served:
            return None
        cmds, trips = {}, {}
        for r in rs:
            for k, v in r["redis_cmds"].items():
                cmds[k] = cmds.get(k, 0) + v
            for k, v in r.get("round_trips", {}).items():
                trips[k] = trips.get(k, 0) + v
        return {
            "client": sum(r["redis_client_cmds"] for r in rs) / served,
            "all": sum(r["redis_all_cmds"] for r in rs) / served,
            "trips": sum(trips.values()) / served,
            "by_cmd": ", ".join(f"{k} {v / served:.3f}" for k, v in
                                sorted(cmds.items(), key=lambda kv: -kv[1])) or "none",
            "by_op": ", ".join(f"{k} {v / served:.3f}" for k, v in
                               sorted(trips.items(), key=lambda kv: -kv[1])) or "none",
        }
    rc = {n: redis_costs(by.get(n, [])) for n in (4, 5)}
    nan_ = float("nan")
    client4 = rc[4]["client"] if rc[4] else nan_
    all4 = rc[4]["all"] if rc[4] else nan_
    trips4 = rc[4]["trips"] if rc[4] else nan_
    cpu = lambda rs: (sum(r["portcullis_cpu_s"] for r in rs) / sum(r["served"] for r in rs) * 1e5) if rs and sum(r["served"] for r in rs) else float("nan")  # noqa: E731
    ngx = by.get(2, [])
    ngx_cpu = (sum(r["nginx_cpu_s"] for r in ngx) / sum(r["served"] for r in ngx) * 1e5) if ngx and sum(r["served"] for r in ngx) else float("nan")
    w("## Cost per request")
    w("")
    w("Per request means per request the upstream answered in the same runs (nginx "
      "`stub_status` delta), which also counts those wrk left in flight at its end. Redis "
      "figures are `INFO commandstats` deltas (Redis counts the commands a Lua script runs under "
      "their own names too) and portcullis' own count of Redis round trips "
      "(`portcullis_redis_command_duration_seconds_count` on /metrics).")
    w("")
    w("| figure | 4 (defaults) | 5 (no local cache) |")
    w("|---|---:|---:|")

    def both(key, fmt="{:.3f}"):
        return " | ".join(fmt.format(rc[n][key]) if rc[n] else "n/a" for n in (4, 5))
    w(f"| Redis round trips per proxied request (portcullis /metrics) | {both('trips')} |")
    w(f"| Redis client script calls per proxied request (EVALSHA + EVAL) | {both('client')} |")
    w(f"| Redis commands per proxied request, including those run inside scripts | {both('all')} |")
    w(f"| portcullis CPU seconds per 100k requests | {cpu(by.get(4, [])):.2f} | {cpu(by.get(5, [])):.2f} |")
    w(f"| portcullis peak RSS (VmHWM) after the throughput runs | {R.get('peak_rss_kib', 0) / 1024:.1f} MiB | {R.get('peak_rss5_kib', 0) / 1024:.1f} MiB |")
    w("")
    w(f"portcullis pass-through (3): {cpu(s3):.2f} CPU seconds per 100k requests; the hyper "
      f"floor (6): {cpu(by.get(6, [])):.2f}; the raw floor (7): {cpu(by.get(7, [])):.2f}; the nginx "
      f"proxy (2, all workers): {ngx_cpu:.2f}.")
    w("")

    def per_request_us(rs, key):
        served = sum(r["served"] for r in rs)
        return sum(r.get(key, 0) for r in rs) / served * 1e6 if served else float("nan")
    w("The proxy's CPU per request, split into user and kernel time (/proc/<pid>/stat), in "
      "microseconds: the kernel's share is the system calls and the loopback TCP work they do.")
    w("")
    w("| # | proxy | user µs | kernel µs |")
    w("|---|---|---:|---:|")
    for n, name, who in ((2, "nginx (all workers)", "nginx"), (3, "portcullis", "portcullis"),
                         (4, "portcullis", "portcullis"), (6, "hyper floor", "portcullis"),
                         (7, "raw floor", "portcullis")):
        rs = by.get(n, [])
        if rs:
            w(f"| {n} | {name} | {per_request_us(rs, who + '_user_s'):.1f} | "
              f"{per_request_us(rs, who + '_kernel_s'):.1f} |")
    w("")
    for n in (4, 5):
        if rc[n]:
            w(f"Scenario {n}, Redis commands per request: {rc[n]['by_cmd']}; portcullis round "
              f"trips per request by operation: {rc[n]['by_op']}.")
            w("")
    perf = R.get("perf") or {}
    if perf:
        w("`perf stat -p <portcullis>` during an extra flat-out run, per request:")
        w("")
        w("| # | task-clock ms | instructions | cycles | context switches | CPU migrations |")
        w("|---|---:|---:|---:|---:|---:|")
        for n, c in sorted(perf.items()):
            def g(k, scale=1.0, fmt="{:.0f}"):
                return fmt.format(c[k] * scale) if k in c else "n/a"
            w(f"| {n} | {g('task-clock', 1, '{:.3f}')} | {g('instructions')} | {g('cycles')} | "
              f"{g('context-switches', 1, '{:.2f}')} | {g('cpu-migrations', 1, '{:.3f}')} |")
        w("")

    refs = R.get("references")
    if refs:
        w("## Cost against nginx and the floor, loaded together")
        w("")
        w(f"portcullis, the nginx proxy (all workers) and the hyper floor, each loaded at "
          f"{refs['rate']} requests/s (wrk, 1 thread, 32 connections) at the same time, so that "
          "the machine's changes of speed hit all three alike; each starts first in turn. CPU "
          "per request answered, from /proc (user + kernel). At a fixed rate below the maximum "
          "every request carries more of the cost of waking up than in the flat-out runs, so "
          "read the ratios, not the microseconds.")
        w("")
        w("| scenario | round | portcullis µs/req | nginx µs/req | floor µs/req | "
          "portcullis / nginx | portcullis / floor |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        ratios = {}
        for r in refs["rows"]:
            to_nginx = r["portcullis"] / r["nginx"]
            to_floor = r["portcullis"] / r["floor"]
            ratios.setdefault(r["scenario"], []).append((to_nginx, to_floor))
            w(f"| {r['scenario']} | {r['round']} | {r['portcullis']:.1f} | {r['nginx']:.1f} | "
              f"{r['floor']:.1f} | {to_nginx:.2f} | {to_floor:.2f} |")
        w("")
        for n, rs in sorted(ratios.items()):
            w(f"- Scenario {n}: portcullis' CPU per request is **{median([a for a, _ in rs]):.2f}×"
              f"** nginx's and **{median([b for _, b in rs]):.2f}×** the floor's (medians).")
        w("")

    api = R.get("api") or {}
    if api:
        w("## Session API")
        w("")
        w(f"wrk, 1 thread, {p['api_connections']} connections, {p['api_duration']} s each. Create "
          "rotates over a pool of fresh users (120-byte User-Agent, deviceId; the IP is the "
          f"connection's); get and list use the players, who have {p['sessions_per_user']} "
          "sessions each.")
        w("")
        w("| endpoint | requests/s | p50 ms | p99 ms | p99.9 ms |")
        w("|---|---:|---:|---:|---:|")
        for k, label in (("create", "POST /create"), ("get", "GET /{sessionId}"),
                         ("list", "GET /user/sessions")):
            if k in api:
                r = api[k]
                w(f"| {label} | {r['rps']:.0f} | {ms(r['p50_us'])} | {ms(r['p99_us'])} | "
                  f"{ms(r['p999_us'])} |")
        w("")
    mem = R.get("memory")
    if mem:
        w("## Redis memory per session")
        w("")
        w(f"Sessions created through the API with a {len(USER_AGENT)}-byte User-Agent, a 36-character "
          "deviceId and 36-character user ids; one Redis key per user holds their sessions.")
        w("")
        w("| sessions per user | sessions (users) | used_memory growth per session | "
          "MEMORY USAGE of a user's key | key / value length |")
        w("|---:|---:|---:|---:|---:|")
        for m in mem:
            w(f"| {m['per_user']} | {m['sessions']} ({m['users']}) | **{m['per_session']:.0f} B** | "
              f"{m['memory_usage_avg']:.0f} B | {m['key_len']} B / {m['value_len_avg']:.0f} B |")
        w("")
    con = R.get("connections")
    if con:
        w("## Connections")
        w("")
        w("| figure | value |")
        w("|---|---:|")
        w(f"| RSS idle (fresh process, Redis connected) | {con['idle_rss_kib'] / 1024:.1f} MiB |")
        w(f"| RSS after one proxied request | {con['idle_after_one_request_kib'] / 1024:.1f} MiB |")
        w(f"| RSS holding {con['held_ok']} idle keep-alive connections (one request each) | **{con['held_rss_kib'] / 1024:.1f} MiB** |")
        w(f"| per held connection | {con['per_connection_b'] / 1024:.1f} KiB |")
        w(f"| RSS after they closed / VmHWM | {con['after_close_rss_kib'] / 1024:.1f} / {con['hwm_kib'] / 1024:.1f} MiB |")
        w(f"| RSS with {con['stalled']} clients each stalled in a {BIG_DOWNLOAD_BYTES >> 20} MiB download (fresh process) | {con['stalled_rss_kib'] / 1024:.1f} MiB |")
        w(f"| per stalled download (what portcullis holds of a response its client does not read) | {con['per_stalled_kib']:.0f} KiB |")
        w("")
        w("Holding 10,000 connections needs about 10,100 descriptors in portcullis and in the "
          "client: bench/run.sh raises `ulimit -n` to 65536 for everything it starts.")
        w("")
    crit = R.get("criterion")
    if crit:
        w("## Micro-benchmarks (criterion, bench/gate.rs)")
        w("")
        w("`cargo bench --bench gate` (1 s warm-up, 2 s measurement); median estimate.")
        w("")
        w("| benchmark | time |")
        w("|---|---:|")
        for k, v in crit.items():
            w(f"| {k} | {v} |")
        w("")

    w("## Targets (issue 7)")
    w("")
    w("| target | measured | |")
    w("|---|---:|---|")

    def row(name, value, ok):
        verdict = "n/a" if ok is None else ("met" if ok else "**missed**")
        w(f"| {name} | {value} | {verdict} |")

    def nan(x):
        return x != x
    row("scenario 4 >= 1.0x nginx (4/2)", f"{r42:.2f}x", None if nan(r42) else r42 >= 1.0)
    row("scenario 3 >= 1.2x nginx (3/2)", f"{r32:.2f}x", None if nan(r32) else r32 >= 1.2)
    row("p99 added latency of 4 over 1 at the fixed rate < 1 ms", f"{ms(added99)} ms",
        None if nan(added99) else added99 < 1000)
    row("<= 1 Redis command per proxied request (round trips portcullis made)", f"{trips4:.3f}",
        None if nan(trips4) else trips4 <= 1.0)
    row("<= 1 Redis command per proxied request (client script calls)", f"{client4:.3f}",
        None if nan(client4) else client4 <= 1.0)
    row("<= 1 Redis command per proxied request (counting those inside scripts)", f"{all4:.2f}",
        None if nan(all4) else all4 <= 1.0)
    if mem:
        worst = max(mem, key=lambda m: m["per_session"])
        row("Redis memory per session < 400 B (120-byte User-Agent), used_memory growth",
            f"{worst['per_session']:.0f} B ({worst['per_user']} per user; "
            + ", ".join(f"{m['per_session']:.0f} B at {m['per_user']}" for m in mem) + ")",
            worst["per_session"] < 400)
    if con:
        row("RSS idle < 30 MiB", f"{con['idle_rss_kib'] / 1024:.1f} MiB", con["idle_rss_kib"] < 30 * 1024)
        # Judged on the connections that answered and stayed open, not on those asked for.
        row(f"RSS with {con['held_ok']} idle connections < 100 MiB "
            + ("" if con["held"] >= 10000 else "(smoke: fewer connections)"),
            f"{con['held_rss_kib'] / 1024:.1f} MiB",
            con["held_rss_kib"] < 100 * 1024 and con["held_ok"] >= con["held"])
    w("")
    if R["notes"] or b.problems:
        w("## Notes")
        w("")
        for n in R["notes"] + b.problems:
            w(f"- {n}")
        w("")
    w(f"Whole run: {R.get('elapsed_s', 0):.0f} s.")
    w("")
    return "\n".join(L)


def render_paired(b, rows):
    out = [
        "# portcullis paired comparison", "",
        f"Generated by `bench/run.sh --against {b.args.against_label}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: commit "
        f"{git_rev()} (current) against the baseline binary `{b.args.against}`. Machine: "
        f"{os.cpu_count()} cores, {cpu_model()}.", "",
        "Both binaries run with the same configuration, Redis and upstream, and get the same "
        "fixed-rate load (wrk, 1 thread, 32 connections) at the same time, so a change in the "
        "machine's speed hits both alike. CPU is user + system time from /proc per request "
        "answered.", "",
        "| scenario | round | req/s each | baseline µs/req | current µs/req | current / baseline "
        "| baseline p99 ms | current p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for r in rows:
        ratio = r["current"]["us"] / r["baseline"]["us"]
        ratios.setdefault(r["scenario"], []).append(ratio)
        out.append(f"| {r['scenario']} | {r['round']} | {r['rate']} | {r['baseline']['us']:.1f} "
                   f"| {r['current']['us']:.1f} | {ratio:.3f} | {ms(r['baseline']['p99'])} "
                   f"| {ms(r['current']['p99'])} |")
    out.append("")
    for name, rs in ratios.items():
        out.append(f"- {name}: median current / baseline CPU per request **{median(rs):.3f}** "
                   f"(rounds: {', '.join(f'{x:.3f}' for x in rs)})")
    out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="a few seconds per step")
    ap.add_argument("--bin", help="the portcullis binary (all but --train --floor need it)")
    ap.add_argument("--floor", help="the hyper_floor binary (scenario 6; the full run needs it)")
    ap.add_argument("--against", help="a baseline portcullis binary: run only the paired "
                                      "comparison of --bin against it")
    ap.add_argument("--against-label", default="", help="how the report names the baseline")
    ap.add_argument("--train", type=int, metavar="SECONDS",
                    help="only drive --bin (a build instrumented for profile-guided "
                         "optimisation) through the request paths for SECONDS each, then stop "
                         "it; without --bin, drive --floor through pass-through load")
    ap.add_argument("--profile", default="release", help="cargo profile of --bin (for the report)")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    ap.add_argument("--no-criterion", action="store_true")
    args = ap.parse_args()
    if not args.bin and not (args.train and args.floor):
        ap.error("--bin is required, except to train --floor")
    if not args.against and not args.train and not args.floor:
        ap.error("--floor is required for the full run")
    bench = Bench(args)

    def on_term(signum, frame):
        raise Failure(f"stopped by signal {signum} (time budget exceeded?)")

    signal.signal(signal.SIGTERM, on_term)
    try:
        return bench.run()
    except Failure as e:
        log(f"FAILED: {e} (logs in {bench.dir})")
        return 1


if __name__ == "__main__":
    sys.exit(main())
