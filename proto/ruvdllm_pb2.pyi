from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorDelta(_message.Message):
    __slots__ = ("name", "shape", "indices", "values", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    indices: bytes
    values: bytes
    scale: float
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., indices: _Optional[bytes] = ..., values: _Optional[bytes] = ..., scale: _Optional[float] = ...) -> None: ...

class BankDelta(_message.Message):
    __slots__ = ("bank", "tensors")
    BANK_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDelta]
    def __init__(self, bank: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorDelta, _Mapping]]] = ...) -> None: ...

class LoRADelta(_message.Message):
    __slots__ = ("round", "node_id", "base_version", "banks", "example_count", "metrics", "nonce", "signature")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    node_id: str
    base_version: int
    banks: _containers.RepeatedCompositeFieldContainer[BankDelta]
    example_count: int
    metrics: _containers.ScalarMap[str, float]
    nonce: bytes
    signature: bytes
    def __init__(self, round: _Optional[int] = ..., node_id: _Optional[str] = ..., base_version: _Optional[int] = ..., banks: _Optional[_Iterable[_Union[BankDelta, _Mapping]]] = ..., example_count: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BankAdapter(_message.Message):
    __slots__ = ("bank", "tensors")
    BANK_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    bank: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, bank: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class MergedAdapter(_message.Message):
    __slots__ = ("version", "round", "banks", "sha256", "ffa_seed", "parent_version", "contributors", "created_unix", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FFA_SEED_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    round: int
    banks: _containers.RepeatedCompositeFieldContainer[BankAdapter]
    sha256: bytes
    ffa_seed: int
    parent_version: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    created_unix: float
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., round: _Optional[int] = ..., banks: _Optional[_Iterable[_Union[BankAdapter, _Mapping]]] = ..., sha256: _Optional[bytes] = ..., ffa_seed: _Optional[int] = ..., parent_version: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., created_unix: _Optional[float] = ..., signature: _Optional[bytes] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "public_key", "model_id", "adapter_version", "software_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    public_key: bytes
    model_id: str
    adapter_version: int
    software_version: str
    def __init__(self, node_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., model_id: _Optional[str] = ..., adapter_version: _Optional[int] = ..., software_version: _Optional[str] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "base_version", "adapter_sha256", "ffa_seed", "density", "local_steps", "learning_rate", "clip_norm", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    FFA_SEED_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_version: int
    adapter_sha256: bytes
    ffa_seed: int
    density: float
    local_steps: int
    learning_rate: float
    clip_norm: float
    options: _containers.ScalarMap[str, str]
    def __init__(self, round: _Optional[int] = ..., base_version: _Optional[int] = ..., adapter_sha256: _Optional[bytes] = ..., ffa_seed: _Optional[int] = ..., density: _Optional[float] = ..., local_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., clip_norm: _Optional[float] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "steps", "block_length", "temperature", "threshold", "seed")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    steps: int
    block_length: int
    temperature: float
    threshold: float
    seed: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., block_length: _Optional[int] = ..., temperature: _Optional[float] = ..., threshold: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("text", "token_ids", "step", "done", "finish_reason", "forwards", "adapter_version")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    step: int
    done: bool
    finish_reason: str
    forwards: int
    adapter_version: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., step: _Optional[int] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., forwards: _Optional[int] = ..., adapter_version: _Optional[int] = ...) -> None: ...

class TrainRoundRequest(_message.Message):
    __slots__ = ("round", "coordinator_address")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    coordinator_address: str
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ..., coordinator_address: _Optional[str] = ...) -> None: ...

class TrainRoundReceipt(_message.Message):
    __slots__ = ("round", "node_id", "digest", "size_bytes", "signature", "example_count", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    node_id: str
    digest: bytes
    size_bytes: int
    signature: bytes
    example_count: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., node_id: _Optional[str] = ..., digest: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., signature: _Optional[bytes] = ..., example_count: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "node", "last_round", "uptime_s")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[HealthResponse.Status]
        SERVING: _ClassVar[HealthResponse.Status]
        NOT_SERVING: _ClassVar[HealthResponse.Status]
    STATUS_UNSPECIFIED: HealthResponse.Status
    SERVING: HealthResponse.Status
    NOT_SERVING: HealthResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    status: HealthResponse.Status
    node: NodeInfo
    last_round: int
    uptime_s: float
    def __init__(self, status: _Optional[_Union[HealthResponse.Status, str]] = ..., node: _Optional[_Union[NodeInfo, _Mapping]] = ..., last_round: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class SubmitDeltaRequest(_message.Message):
    __slots__ = ("delta",)
    DELTA_FIELD_NUMBER: _ClassVar[int]
    delta: bytes
    def __init__(self, delta: _Optional[bytes] = ...) -> None: ...

class SubmitDeltaReceipt(_message.Message):
    __slots__ = ("accepted", "digest", "size_bytes", "reason", "detail")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    digest: bytes
    size_bytes: int
    reason: str
    detail: str
    def __init__(self, accepted: _Optional[bool] = ..., digest: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class WatchAdaptersRequest(_message.Message):
    __slots__ = ("after_version",)
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    after_version: int
    def __init__(self, after_version: _Optional[int] = ...) -> None: ...
