"""Fake backend: no data moves; every write succeeds at once. For testing the control flow."""

from __future__ import annotations

from pdserve.disagg.transfer import AgentInfo, TransferEngine, TransferState, WriteRun


class FakeTransferEngine(TransferEngine):
    name = "fake"

    def local_info(self) -> AgentInfo:
        return AgentInfo(self.name, self.agent_name, b"", tuple(self.regions))

    def add_peer(self, info: AgentInfo) -> None:
        pass

    def remove_peer(self, agent_name: str) -> None:
        pass

    def write(self, peer: str, runs: list[WriteRun]) -> object:
        return None

    def poll(self, handle: object) -> TransferState:
        return TransferState.SUCCESS
