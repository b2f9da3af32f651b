"""NIXL backend: the prefill side WRITEs straight into the decode side's registered KV pool (no staging).

Package: ``nixl-cu12==1.5.1`` (imports as ``nixl_cu12``; works on a CPU-only host, torch need not have
CUDA). The ``nixl`` 1.5.1 meta package would pull both nixl-cu12 and nixl-cu13 (~140 MB); it also works
(``import nixl``) and is preferred when present.

Configuration (all measured on the 2-core CI box):

* UCX error-handling mode ``none`` (backend param ``ucx_error_handling_mode``). With NIXL's default
  ``peer`` mode UCX only picks transports that report peer failures, which excludes shared memory/CMA,
  so same-host writes fall back to TCP loopback and need the *receiver* to progress its worker (a
  progress thread busy-spinning a core; ~12 ms per transfer). With ``none`` a same-host WRITE is a
  zero-copy ``process_vm_writev`` (UCX ``cma``) done by the sender alone, and the receiver needs no
  progress thread at all. Measured (benchmarks/kv_transfer_backends.py, SmolLM2-135M KV): 4-6 GB/s for
  contiguous destination slots (60 runs, 0.1-3 MB each; in-process memcpy 7-11 GB/s), ~10 us for a tiny
  write, but ~2-3 us per run when every slot is its own 768 B run (0.3 GB/s scattered).
  A dead peer is still detected: CMA fails with ESRCH and NIXL raises NIXL_ERR_REMOTE_DISCONNECT,
  which ``write``/``poll`` turn into TransferState.FAILED.
  CMA needs ptrace permission between the two processes (same uid; kernel.yama.ptrace_scope <= 1).
* No NIXL progress thread (``enable_prog_thread=False``) and no listener thread: metadata travels in
  AgentInfo.payload over pdserve's own bootstrap channel, so NIXL itself opens no port.
* Environment set (``setdefault``, so an operator's value wins) before UCX is initialised:
  ``UCX_MODULES=^ib`` (no verbs probing), ``NIXL_LOG_LEVEL=WARN``, ``UCX_WARN_UNUSED_ENV_VARS=n``, and,
  when the engine's host is a loopback address, ``UCX_NET_DEVICES=lo``. UCX opens a TCP listening
  socket per network device it uses (it listened on the machine's external address as well as
  127.0.0.1 by default); with ``UCX_NET_DEVICES=lo`` the only socket is on 127.0.0.1.
  For a cross-node deployment set UCX_NET_DEVICES to the data NIC yourself. Across nodes UCX moves
  data over TCP (or RDMA when present), and TCP puts need the receiver to progress its worker:
  that case would need a progress thread on the decode side, which this engine does not start.
* ``ib_device`` is not used: pick UCX devices with UCX_NET_DEVICES.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Any

import numpy as np

from pdserve.config import is_loopback
from pdserve.disagg.backends._runs import merge_adjacent, run_addresses
from pdserve.disagg.transfer import AgentInfo, MemRegion, TransferEngine, TransferState, WriteRun
from pdserve.envs import ENVS

logger = logging.getLogger(__name__)

_api: Any = None


def _set_env(host: str) -> None:
    os.environ.setdefault("UCX_MODULES", "^ib")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if is_loopback(host):
        os.environ.setdefault("UCX_NET_DEVICES", "lo")


def _load_api() -> Any:
    global _api
    if _api is None:
        errors = []
        for mod in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
            try:
                _api = importlib.import_module(mod)
                break
            except ImportError as e:
                errors.append(f"{mod}: {e}")
        else:
            raise ImportError("NIXL is not installed (pip install nixl-cu12==1.5.1): " + "; ".join(errors))
    return _api


class _NixlWrite:
    __slots__ = ("peer", "nbytes", "xfer", "state", "error")

    def __init__(self, peer: str, nbytes: int):
        self.peer = peer
        self.nbytes = nbytes
        self.xfer: Any = None
        self.state = TransferState.TRANSFERRING
        self.error: str | None = None

    def __repr__(self) -> str:
        err = f" {self.error}" if self.error else ""
        return f"<nixl write to {self.peer}: {self.nbytes} B {self.state.value}{err}>"


class NixlTransferEngine(TransferEngine):
    name = "nixl"

    def __init__(self, agent_name: str, host: str, regions: list[MemRegion], ib_device: str | None = None):
        super().__init__(agent_name, host, regions, ib_device)
        _set_env(host)
        api = _load_api()
        self._lock = threading.Lock()
        self._backend = ENVS.disagg_nixl_backend
        conf = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
        self._agent = api.nixl_agent(agent_name, conf)
        plugins = self._agent.get_plugin_list()
        if self._backend not in plugins:
            raise RuntimeError(f"NIXL backend {self._backend!r} not available (plugins: {plugins})")
        params: dict[str, str] = {}
        if self._backend == "UCX":
            params["ucx_error_handling_mode"] = "none"
        self._agent.create_backend(self._backend, params)
        self._reg = None
        if self.regions:
            self._reg = self._agent.register_memory([(m.ptr, m.nbytes, 0, "") for m in self.regions], "DRAM",
                                                    backends=[self._backend])
        self._metadata: bytes = self._agent.get_agent_metadata()
        self._peers: dict[str, AgentInfo] = {}
        self._live: set[_NixlWrite] = set()

    def local_info(self) -> AgentInfo:
        return AgentInfo(self.name, self.agent_name, self._metadata, tuple(self.regions))

    def add_peer(self, info: AgentInfo) -> None:
        self.check_peer_backend(info)
        with self._lock:
            old = self._peers.get(info.agent_name)
            if old is not None:
                if old.payload == info.payload and old.regions == info.regions:
                    return
                self._agent.remove_remote_agent(info.agent_name)  # peer restarted: reload its metadata
                del self._peers[info.agent_name]
            loaded = self._agent.add_remote_agent(info.payload)
            if isinstance(loaded, bytes):
                loaded = loaded.decode()
            if loaded != info.agent_name:
                self._agent.remove_remote_agent(loaded)
                raise ValueError(f"NIXL metadata names agent {loaded!r}, AgentInfo says {info.agent_name!r}")
            self._peers[info.agent_name] = info

    def remove_peer(self, agent_name: str) -> None:
        with self._lock:
            if self._peers.pop(agent_name, None) is not None:
                try:
                    self._agent.remove_remote_agent(agent_name)
                except Exception as e:  # noqa: BLE001 - best effort
                    logger.warning("nixl: removing peer %s: %s", agent_name, e)

    def write(self, peer: str, runs: list[WriteRun] | np.ndarray) -> _NixlWrite:
        info = self._peers.get(peer)
        if info is None:
            raise ValueError(f"nixl: unknown peer {peer!r}; call add_peer first")
        src, dst, lens = merge_adjacent(*run_addresses(self.regions, info.regions, runs))
        handle = _NixlWrite(peer, int(lens.sum()))
        if len(src) == 0:
            handle.state = TransferState.SUCCESS
            return handle
        zeros = np.zeros(len(src), dtype=np.uint64)
        src_arr = np.stack([src, lens, zeros], axis=1)
        dst_arr = np.stack([dst, lens, zeros], axis=1)
        with self._lock:
            try:
                src_d = self._agent.get_xfer_descs(src_arr, "DRAM")
                dst_d = self._agent.get_xfer_descs(dst_arr, "DRAM")
                handle.xfer = self._agent.initialize_xfer("WRITE", src_d, dst_d, peer, backends=[self._backend])
                self._live.add(handle)
                self._set_state(handle, self._agent.transfer(handle.xfer))
            except Exception as e:  # noqa: BLE001 - NIXL raises e.g. nixlRemoteDisconnectError for a dead peer
                self._fail(handle, e)
        return handle

    def poll(self, handle: object) -> TransferState:
        assert isinstance(handle, _NixlWrite)
        if handle.state is TransferState.TRANSFERRING:
            with self._lock:
                if handle.state is TransferState.TRANSFERRING:
                    try:
                        self._set_state(handle, self._agent.check_xfer_state(handle.xfer))
                    except Exception as e:  # noqa: BLE001
                        self._fail(handle, e)
        return handle.state

    def release(self, handle: object) -> None:
        assert isinstance(handle, _NixlWrite)
        with self._lock:
            if handle.state is TransferState.TRANSFERRING:
                handle.state = TransferState.FAILED
                handle.error = "released before completion"
            self._free(handle)

    def close(self) -> None:
        with self._lock:
            for h in list(self._live):
                self._free(h)
            for name in list(self._peers):
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:  # noqa: BLE001
                    pass
            self._peers.clear()
            if self._reg is not None:
                try:
                    self._agent.deregister_memory(self._reg, backends=[self._backend])
                except Exception as e:  # noqa: BLE001
                    logger.warning("nixl: deregister: %s", e)
                self._reg = None

    # --- internals (caller holds self._lock) ---

    def _set_state(self, handle: _NixlWrite, status: str) -> None:
        if status == "DONE":
            handle.state = TransferState.SUCCESS
            self._free(handle)
        elif status == "PROC":
            handle.state = TransferState.TRANSFERRING
        else:
            self._fail(handle, RuntimeError(f"NIXL transfer state {status}"))

    def _fail(self, handle: _NixlWrite, err: BaseException) -> None:
        handle.state = TransferState.FAILED
        handle.error = f"{type(err).__name__}: {err}"
        logger.warning("nixl: write of %d B to %s failed: %s", handle.nbytes, handle.peer, handle.error)
        self._free(handle)

    def _free(self, handle: _NixlWrite) -> None:
        self._live.discard(handle)
        if handle.xfer is not None:
            xfer, handle.xfer = handle.xfer, None
            try:
                xfer.release()
            except Exception as e:  # noqa: BLE001 - an active transfer that cannot be cancelled
                logger.warning("nixl: releasing transfer to %s: %s", handle.peer, e)
