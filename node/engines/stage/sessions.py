"""Map sessions to KV slots: a fixed pool of slots, each holding one session's positions."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import CapacityExhausted


@dataclass
class SessionState:
    slot: int
    length: int = 0  # positions [0, length) of this slot hold valid K/V


class SlotTable:
    def __init__(self, slots: int) -> None:
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._sessions: dict[str, SessionState] = {}
        self.capacity = slots

    def get(self, session_id: str) -> SessionState | None:
        return self._sessions.get(session_id)

    def open(self, session_id: str) -> SessionState:
        if not self._free:
            raise CapacityExhausted(
                f"all {self.capacity} KV slots of this stage are in use; release a session or retry later"
            )
        state = SessionState(slot=self._free.pop())
        self._sessions[session_id] = state
        return state

    def release(self, session_id: str) -> bool:
        state = self._sessions.pop(session_id, None)
        if state is None:
            return False
        self._free.append(state.slot)
        return True

    def __len__(self) -> int:
        return len(self._sessions)
