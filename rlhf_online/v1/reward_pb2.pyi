from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "completion", "completion_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    completion_id: str
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., completion_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "reward_model_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    reward_model_version: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., reward_model_version: _Optional[str] = ...) -> None: ...

class TrainRewardRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRewardModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewardModelInfo(_message.Message):
    __slots__ = ("version", "metrics", "feedback_seen")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_SEEN_FIELD_NUMBER: _ClassVar[int]
    version: str
    metrics: _containers.ScalarMap[str, float]
    feedback_seen: int
    def __init__(self, version: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., feedback_seen: _Optional[int] = ...) -> None: ...

class TrainRewardResponse(_message.Message):
    __slots__ = ("model", "promoted", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: RewardModelInfo
    promoted: bool
    reason: str
    def __init__(self, model: _Optional[_Union[RewardModelInfo, _Mapping]] = ..., promoted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
