"""One typed configuration for every EdgeMesh process and command.

Each field carries its help text; the CLI builds each command's flags from its dataclass
here (mesh.settings) and every flag can also come from the environment as EDGEMESH_<FIELD>
(for example EDGEMESH_CLUSTER_KEY, EDGEMESH_FIRST_TOKEN_S), so there is exactly one list
of settings. Timeouts and Limits are nested in every command that uses them.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mesh.allowed_models import parse_allowed
from mesh.errors import ConfigError
from mesh.placement.planner import STRATEGIES
from mesh.ray import DEFAULT_NAMESPACE
from mesh.settings import ENV_PREFIX, nested, same_as, setting
from mesh.settings import add_arguments as add_arguments  # re-exported: the CLI and tests build flags with it
from mesh.settings import from_arguments as from_arguments
from mesh.types import ACTIVATION_DTYPES

LOOPBACK = "127.0.0.1"


def home_dir() -> Path:
    """Where EdgeMesh keeps its model cache, cluster key and shard cache."""
    configured = os.environ.get(ENV_PREFIX + "HOME")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgemesh"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'60MB' -> 60_000_000, '2GiB' -> 2147483648, '0' -> 0."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size (examples: 512MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Timeouts:
    """Every timeout and protocol timing in one place; tests shorten them, nothing hard-codes them."""

    every_value_positive: ClassVar[bool] = True  # a flag or variable of 0, -1, nan or inf is refused

    connect_s: float = setting(5.0, "deadline to reach a peer before it counts as unreachable")
    info_rpc_s: float = setting(5.0, "deadline of the Info RPC")
    first_token_s: float = setting(120.0, "deadline for a node's first token (covers prefill and queueing)")
    token_idle_s: float = setting(30.0, "longest silence between two tokens before a stream counts as failed")
    request_s: float = setting(1800.0, "deadline of a whole generation stream")
    keepalive_time_s: float = setting(10.0, "gRPC keepalive ping interval on idle and busy channels")
    keepalive_timeout_s: float = setting(5.0, "how long a keepalive ping may go unanswered")
    auth_skew_s: float = setting(120.0, "largest clock difference accepted in a cluster-key signature")
    refresh_s: float = setting(5.0, "how often the gateway refreshes each node's Info")
    stage_step_s: float = setting(5.0, "deadline of one decode step through one pipeline stage; slower "
                                  "counts as a failed stage (a 0.5 s stall does not)")
    head_margin_s: float = setting(2.0, "how much longer the gateway waits for a pipeline's head than the head "
                                   "waits for a later stage, so that a stalled stage is blamed, not the head")
    embed_rpc_s: float = setting(120.0, "deadline of one Embed call (a batch of inputs on one replica, queueing "
                                 "behind the generation steps of that node included)")
    drain_s: float = setting(60.0, "longest a draining node waits for in-flight streams before it exits")
    http_header_s: float = setting(10.0, "longest the gateway waits for a request's headers (from the connection "
                                   "or the previous answer) before it closes the connection")
    http_body_s: float = setting(60.0, "longest the gateway waits for a whole request body (408 after that)")
    template_render_s: float = setting(2.0, "longest a chat template may take to render one conversation; a "
                                       "slower one is refused (400) and the gateway goes on")


@dataclass(frozen=True)
class Limits:
    """Sizes a process accepts from peers and clients."""

    every_value_positive: ClassVar[bool] = True

    max_message_bytes: int = setting(64 * 2**20, "largest gRPC message sent or received")
    max_request_bytes: int = setting(4 * 2**20, "largest request of a single-message node RPC (every one but "
                                     "the Forward stream); larger gets RESOURCE_EXHAUSTED before it is parsed")
    auth_nonces: int = setting(100_000, "signed gRPC calls a node remembers to refuse a replay (about 200 bytes "
                               "each); past this many within the clock window the oldest are forgotten and "
                               "calls signed before them refused")
    grpc_window_bytes: int = setting(2**20, "fixed HTTP/2 receive window of a node's gRPC streams: what a "
                                     "caller may send ahead of the node's reading (and of its refusal)")
    max_prompt_chars: int = setting(1_000_000, "largest prompt text the gateway accepts")
    max_messages: int = setting(4096, "most messages in one chat request (each costs template work even when empty)")
    max_stop_chars: int = setting(512, "longest stop string (each is matched against the answer as it streams)")
    max_embedding_inputs: int = setting(2048, "most inputs in one embeddings request")
    max_embedding_tokens: int = setting(512, "longest embeddings input, in tokens; never more than the 512 a "
                                        "node's embedding context holds (mesh.types.EMBED_CONTEXT_TOKENS) nor the "
                                        "context the model is served with")
    max_schema_bytes: int = setting(64 * 2**10, "largest JSON schema (response_format, or one tool's parameters) "
                                    "in compact JSON bytes")
    max_schema_depth: int = setting(32, "deepest nesting of objects and lists in one JSON schema")
    max_body_bytes: int = setting(4 * 2**20, "largest HTTP request body the gateway accepts")
    max_http_connections: int = setting(512, "HTTP connections the gateway serves at once; a request on one more "
                                        "gets 503, and past twice this many connections are closed at once")
    template_max_chars: int = setting(4_000_000, "longest prompt a chat template may render, and longest value it "
                                      "may build; all it builds together may be 16 times this")
    template_max_source_bytes: int = setting(256 * 2**10, "largest chat template (UTF-8 bytes) a model may carry; "
                                             "real ones are at most about 17 KB, a bigger one is refused at load")
    template_max_steps: int = setting(1_000_000, "loop turns, calls, lookups and outputs a chat template may make "
                                      "for one conversation")
    max_step_connections: int = setting(256, "step-socket connections a node serves at once (one per pipeline "
                                        "request through it); more get RESOURCE_EXHAUSTED")
    max_step_handshakes: int = setting(64, "step-socket connections a node holds while they prove the cluster "
                                       "key (not counted as step connections); past this the oldest is dropped, "
                                       "so idle connections cannot lock a pipeline head out")
    max_metrics_connections: int = setting(32, "connections a node's metrics server serves at once (a thread "
                                           "each); past this the oldest is dropped")


def check_thread_counts(threads: int, decode_threads: int) -> None:
    """Thread counts are 0 (chosen for the machine) or a positive count."""
    for flag, value in (("--threads", threads), ("--decode-threads", decode_threads)):
        if value < 0:
            raise ConfigError(f"{flag} must be 0 (automatic) or a positive count, not {value}")


def check_ports_free(host: str, ports: tuple[tuple[str, int], ...]) -> None:
    """Fail at once, before any slow start-up work (hashing, loading, probing), when a fixed
    port is taken, given twice, or `host` is not this machine's. Each server still binds for
    itself later; this makes the common mistake quick and a one-line error."""
    seen: dict[int, str] = {}
    for flag, port in ports:
        if port < 0:  # the step socket's -1: off
            continue
        if port in seen:  # 0 (a free port, chosen by the system) is checked once, for the address
            if port == 0:
                continue
            raise ConfigError(f"{seen[port]} and {flag} are both {port}; give each its own port")
        seen[port] = flag
        try:
            family, kind, proto, _name, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except (socket.gaierror, UnicodeError) as exc:
            raise ConfigError(f"cannot listen on {host!r}: {exc}") from None
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers: TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as exc:
                hint = {errno.EADDRINUSE: f"another program (or node) listens there: choose another {flag}, "
                                          "or 0 for a free one",
                        errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
                        errno.EACCES: "ports below 1024 need privileges"}.get(exc.errno or 0, f"choose another {flag}")
                raise ConfigError(f"cannot listen on {host}:{port} ({flag}): {exc.strerror}; {hint}") from None


@dataclass(frozen=True)
class NodeConfig:
    model: str = setting("default", "GGUF model to serve: a catalogue name (see `edgemesh model list`), a "
                         "cached model's file name, or a path")
    name: str = setting("", "human name of this node (default: host name)")
    host: str = setting(LOOPBACK, "address to bind gRPC and metrics on (0.0.0.0 for the LAN)")
    port: int = setting(7471, "gRPC port (0 picks a free one)")
    metrics_port: int = setting(9471, "Prometheus metrics port (0 picks a free one)")
    step_port: int = setting(7472, "port of the step socket that pipeline heads send steps through (0 picks a "
                             "free one; -1 turns it off and heads use gRPC Forward)")
    threads: int = setting(0, "compute threads (0 = all cores)")
    decode_threads: int = setting(0, "threads of single-token pipeline steps (0 = --threads)")
    memory_limit: str = setting("0", "memory this node may use, e.g. 2GiB (0 = free memory)")
    cluster_key: str = setting("", "shared secret of the mesh (default: $EDGEMESH_HOME/cluster.key)",
                               secret=True)
    slots: int = setting(0, "requests generated at the same time (0 = as many as the memory budget holds, "
                         "at most 8)")
    max_queue: int = setting(8, "requests queued beyond the running ones before RESOURCE_EXHAUSTED")
    n_ctx: int = setting(2048, "context length (tokens) per request")
    model_from_peers: bool = setting(False, "no local model file: fetch the layers this node is asked to serve "
                                     "from a peer that has it (cached in $EDGEMESH_HOME/shards)")
    peer: tuple[str, ...] = setting((), "with --model-from-peers: a node that has the model (HOST:PORT, "
                                    "repeatable); default: found by mDNS")
    role: str = setting("auto", "auto: the gateway decides whether this node serves the whole model, a layer "
                        "range or stands by; stage: layer ranges only, never the whole model; replica: also "
                        "load the whole model at start")
    advertise: bool = setting(True, "advertise this node with mDNS")
    insecure_plaintext: bool = setting(False, "debugging only, loopback only: speak plain text to the mesh "
                                       "instead of mutual TLS (the gateway and every node must say it)")
    ready_file: str = setting("", "write 'host port metrics_port node_id' here once serving (for supervisors; "
                              "see mesh.ready_file)")
    allowed_models: tuple[str, ...] = setting(
        (), "sha256 of a model this node may load, serve and ship (repeatable; env EDGEMESH_ALLOWED_MODELS, "
        "comma separated); any other is refused. Default: every model", flag="--allow-model")
    timeouts: Timeouts = nested(Timeouts, "timeouts (seconds)")
    limits: Limits = nested(Limits, "limits")

    def __post_init__(self) -> None:
        check_thread_counts(self.threads, self.decode_threads)
        object.__setattr__(self, "allowed_models", parse_allowed(self.allowed_models))


@dataclass(frozen=True)
class GatewayConfig:
    host: str = setting(LOOPBACK, "address to bind the HTTP API on")
    port: int = setting(8080, "HTTP port (0 picks a free one)")
    cluster_key: str = setting("", "shared secret of the mesh (default: $EDGEMESH_HOME/cluster.key)",
                               secret=True)
    api_key: str = setting("", "bearer key clients must send; required on a non-loopback address",
                           secret=True)
    peer: tuple[str, ...] = setting((), "static node address HOST:PORT (repeatable), besides mDNS")
    model: str = setting("default", "GGUF model whose tokenizer and chat template the gateway uses")
    discovery: bool = setting(True, "browse mDNS for nodes")
    ready_file: str = setting("", "write 'host port' here once serving (for supervisors)")
    policy: str = setting("local-only", "routing: local-only, cloud-first (the cloud unless it is down, then "
                          "the mesh) or local-first (the mesh unless it is full, then the cloud)")
    cloud_url: str = setting("", "base URL of an OpenAI-compatible cloud API, e.g. https://api.example.com/v1")
    cloud_model: str = setting("", "model name to ask the cloud for (default: the client's)")
    cloud_key_env: str = setting("", "name of the environment variable that holds the cloud API key")
    strategy: str = setting("auto", "placement: auto (replicas where the model fits a node, pipelines of layer "
                            "ranges where it does not), replica (whole model only) or pipeline (one pipeline "
                            "over the nodes; the rest stand by)")
    stages: int = setting(0, "pipeline stages wanted (0 = as few as the nodes' memory allows; with --strategy "
                          "pipeline, one per node)")
    activation_dtype: str = setting(
        "f32", "how pipeline stages hand on hidden states: f32 (output identical to llama.cpp's), f16 or q8_0 "
        "(half or about a quarter of the bytes; the output may drift), or auto (each link picks by its measured "
        "round trip: f32 below 2 ms, f16 below 8 ms, q8_0 beyond)", choices=ACTIVATION_DTYPES)
    insecure_plaintext: bool = setting(False, "debugging only, loopback only: speak plain text to the nodes "
                                       "instead of mutual TLS (every node must say it too)")
    placement: bool = setting(True, "place the model on the nodes (load, re-plan, release); --no-placement only "
                              "routes to what the nodes already hold")
    allowed_models: tuple[str, ...] = setting(
        (), "sha256 of an approved model (repeatable; env EDGEMESH_ALLOWED_MODELS, comma separated): --model must "
        "be one, and nodes holding any other are never used. Default: every model", flag="--allow-model")
    system_prompt_file: str = setting("", "file whose text (UTF-8) opens every chat as the first system message, "
                                      "before the client's own; /v1/completions is then refused (403)")
    deny_pattern: tuple[str, ...] = setting((), "regular expression (case-insensitive; repeatable) that refuses a "
                                            "prompt (400 content_policy) and stops an answer "
                                            "(finish_reason content_filter)")
    api_keys_file: str = setting("", "file of named bearer keys, one 'NAME KEY' per line ('#' comments), "
                                 "re-read when it changes; besides or instead of --api-key")
    model_alias: tuple[str, ...] = setting((), "another name clients may ask for the model by, NAME=MODEL "
                                           "(repeatable), for clients that hard-code one, e.g. gpt-4o-mini=default")
    cors_origin: tuple[str, ...] = setting((), "a web origin (scheme://host[:port], or *) whose pages may call the "
                                           "API from a browser (repeatable); default: none")
    timeouts: Timeouts = nested(Timeouts, "timeouts (seconds)")
    limits: Limits = nested(Limits, "limits")

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_models", parse_allowed(self.allowed_models))


# ---------------------------------------------------------------------------- launchers
# A launcher's setting that means what the gateway's or a node's does is declared `same_as`
# it; the launcher hands those on by name (mesh.settings.shared).

@dataclass(frozen=True)
class UpConfig:
    """`edgemesh up`: N node processes and a gateway on this machine (mesh.local_mesh)."""

    nodes: int = setting(2, "how many nodes to start")
    host: str = same_as(GatewayConfig, "host")
    port: int = same_as(GatewayConfig, "port")
    model: str = same_as(NodeConfig, "model")
    strategy: str = setting("auto", "auto: replicas where the model fits, pipelines where it does not (see "
                            "`edgemesh plan`); replica: every node serves the whole model; pipeline: the nodes "
                            "split its layers", choices=STRATEGIES)
    stages: int = setting(0, "pipeline stages (0 = as the planner finds; with --strategy pipeline, one per node)")
    threads: int = setting(0, "threads per node (0 = cores / nodes for replicas, all cores for pipeline stages)")
    decode_threads: int = setting(0, "threads of a single-token pipeline step (0 = as --threads)")
    slots: int = same_as(NodeConfig, "slots")
    n_ctx: int = same_as(NodeConfig, "n_ctx")
    memory_limit: str = setting("0", "memory each node may use, e.g. 60MB (0 = an equal share of free memory)")
    api_key: str = same_as(GatewayConfig, "api_key")
    # Not from EDGEMESH_CLUSTER_KEY: that is the key of the real mesh a shell may be set up for,
    # and a local mesh under it would take that mesh's nodes (found by mDNS) as its own.
    cluster_key: str = setting("", "cluster key (default: a fresh one for this mesh)", secret=True,
                               environment=False)
    ready_file: str = setting("", "write 'host port' of the gateway here once all nodes are up")
    policy: str = same_as(GatewayConfig, "policy")
    cloud_url: str = same_as(GatewayConfig, "cloud_url")
    cloud_model: str = same_as(GatewayConfig, "cloud_model")
    cloud_key_env: str = same_as(GatewayConfig, "cloud_key_env")
    insecure_plaintext: bool = same_as(GatewayConfig, "insecure_plaintext")
    activation_dtype: str = same_as(GatewayConfig, "activation_dtype")
    allowed_models: tuple[str, ...] = same_as(GatewayConfig, "allowed_models")  # the gateway's and every node's
    system_prompt_file: str = same_as(GatewayConfig, "system_prompt_file")
    deny_pattern: tuple[str, ...] = same_as(GatewayConfig, "deny_pattern")
    api_keys_file: str = same_as(GatewayConfig, "api_keys_file")
    timeouts: Timeouts = nested(Timeouts, "timeouts (seconds; the gateway's and every node's)")
    limits: Limits = nested(Limits, "limits (the gateway's and every node's)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_models", parse_allowed(self.allowed_models))


@dataclass(frozen=True)
class RayClusterConfig:
    """Which Ray cluster and namespace `edgemesh ray up|down` acts on (mesh.ray)."""

    address: str = setting("auto", "Ray cluster address, HOST:PORT of its head (GCS); auto: as ray.init finds it")
    namespace: str = setting(DEFAULT_NAMESPACE, "Ray namespace of the node actors")


@dataclass(frozen=True)
class RayUpConfig:
    """`edgemesh ray up`: N node actors on a Ray cluster and the gateway here (mesh.ray.launcher)."""

    address: str = same_as(RayClusterConfig, "address")
    namespace: str = same_as(RayClusterConfig, "namespace")
    nodes: int = setting(2, "node actors to start")
    strategy: str = setting("auto", "auto: replicas where Ray's memory resource of a node holds the model, "
                            "pipelines where it does not; replica: every node serves the whole model; pipeline: "
                            "they split its layers", choices=STRATEGIES)
    stages: int = setting(0, "pipeline stages (0 = one per node; the rest are spare)")
    host: str = same_as(GatewayConfig, "host")
    port: int = same_as(GatewayConfig, "port")
    model: str = setting("default", "a catalogue name (see `edgemesh model list`; resolved, and pulled if need "
                         "be, on each Ray node), or a GGUF path that exists on every Ray node")
    threads: int = setting(0, "threads per node (0 = the Ray node's CPUs shared among its node actors)")
    decode_threads: int = same_as(UpConfig, "decode_threads")
    slots: int = same_as(NodeConfig, "slots")
    n_ctx: int = same_as(NodeConfig, "n_ctx")
    memory_limit: str = setting("0", "memory each node may use, e.g. 60MB (0 = the Ray node's memory resource, "
                                "shared)")
    node_host: str = setting("auto", "address the nodes bind: auto (loopback when every Ray node is on this "
                             "machine, else each Ray node's IP), ray (each Ray node's IP), or an address")
    node_cpus: float = setting(0.01, "CPUs each node actor reserves in Ray's accounting; the nodes use --threads "
                               "cores whatever it says, so the default only pins them without crowding out "
                               "other Ray work")
    max_restarts: int = setting(-1, "how often Ray restarts a node actor whose process died (-1 = always)")
    api_key: str = same_as(GatewayConfig, "api_key")
    cluster_key: str = same_as(UpConfig, "cluster_key")
    ready_file: str = same_as(UpConfig, "ready_file")
    policy: str = same_as(GatewayConfig, "policy")
    cloud_url: str = same_as(GatewayConfig, "cloud_url")
    cloud_model: str = same_as(GatewayConfig, "cloud_model")
    cloud_key_env: str = same_as(GatewayConfig, "cloud_key_env")
    timeouts: Timeouts = nested(Timeouts, "timeouts (seconds; the gateway's and every node's)")
    limits: Limits = nested(Limits, "limits (the gateway's and every node's)")


@dataclass(frozen=True)
class BenchConfig:
    """`edgemesh bench`: a local mesh's streaming speed against llama-cpp-python (mesh.bench)."""

    model: str = same_as(NodeConfig, "model")
    nodes: int = setting(1, "nodes in the benchmarked mesh")
    strategy: str = setting("replica", "placement of the benchmarked mesh", choices=("replica", "pipeline"))
    tokens: int = setting(128, "tokens generated per run")
    runs: int = setting(3, "timed runs of each side")
    threads: int = setting(0, "threads (0 = all cores)")
    prefill_tokens: int = setting(512, "prompt length of the prefill measurement")
    decode_threads: int = setting(0, "threads of single-token pipeline steps (0 = the mesh's default)")
    insecure_plaintext: bool = setting(False, "run the benchmarked mesh without TLS (to measure what TLS costs)")
    concurrency: str = setting("", "streams at once, e.g. 1,2,4,8: aggregate speed against llama.cpp's batched "
                                   "decode of as many sequences, instead of the single-stream figures")
    prefill_beside: int = setting(0, "with --concurrency: also the longest gap between tokens of this many "
                                     "running streams while a --prefill-tokens prompt is prefilled beside "
                                     "them (0 = not measured)")
    slots: int = same_as(NodeConfig, "slots")
    timeouts: Timeouts = nested(Timeouts, "timeouts (seconds; of the benchmarked mesh)")
    limits: Limits = nested(Limits, "limits (of the benchmarked mesh)")


@dataclass(frozen=True)
class PlanConfig:
    """`edgemesh plan`: how the planner places the model, offline or a live gateway's (mesh.plan_cli)."""

    dry_run: bool = setting(False, "plan N made-up local nodes without starting anything")
    url: str = setting("", "explain the live plan of the gateway at URL, from its nodes' reports")
    api_key: str = setting("", "bearer key, if the gateway asks for one", secret=True)
    model: str = same_as(NodeConfig, "model")
    nodes: int = setting(3, "made-up nodes to plan")
    memory_limit: str = setting("0", "memory each node may use (0 = free memory / nodes)")
    n_ctx: int = same_as(NodeConfig, "n_ctx")
    strategy: str = setting("auto", "as `edgemesh up --strategy`", choices=STRATEGIES)
    stages: int = setting(0, "pipeline stages (0 = as the planner finds)")
    speeds: str = setting("", "decode tokens/s per node, e.g. 30,10,10 (default: equal)")


def resolve_cluster_key(explicit: str) -> str:
    """The cluster key from the flag/env, else from $EDGEMESH_HOME/cluster.key, created on first use
    so that nodes and a gateway on one machine agree without any set-up."""
    if explicit:
        return explicit
    path = home_dir() / "cluster.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole to a private temporary file, then linked into place: a process that
        # starts at the same moment sees either no file or the complete key, never an empty one.
        tmp = path.with_name(f".cluster.key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process was first: use its key
            pass
        finally:
            tmp.unlink()
    key = path.read_text().strip()
    if not key:
        raise ConfigError(f"{path} is empty; delete it (a new key is made) or write the mesh's key into it")
    return key


def default_node_name() -> str:
    return socket.gethostname().split(".")[0] or "node"
