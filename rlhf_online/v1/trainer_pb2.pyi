from rlhf_online.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("current", "canary", "round_in_progress", "rounds_total", "last_round", "feedback_since_last_round")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    ROUND_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_SINCE_LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    current: str
    canary: str
    round_in_progress: bool
    rounds_total: int
    last_round: RoundResult
    feedback_since_last_round: int
    def __init__(self, current: _Optional[str] = ..., canary: _Optional[str] = ..., round_in_progress: _Optional[bool] = ..., rounds_total: _Optional[int] = ..., last_round: _Optional[_Union[RoundResult, _Mapping]] = ..., feedback_since_last_round: _Optional[int] = ...) -> None: ...

class RunRoundRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("outcome", "version", "reason", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    version: str
    reason: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, outcome: _Optional[str] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies", "current", "canary")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[_generation_pb2.Policy]
    current: str
    canary: str
    def __init__(self, policies: _Optional[_Iterable[_Union[_generation_pb2.Policy, _Mapping]]] = ..., current: _Optional[str] = ..., canary: _Optional[str] = ...) -> None: ...

class ActivatePolicyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...
