from services.common.pb import common_pb2 as _common_pb2
from services.common.pb import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_SOURCE_UNSPECIFIED: _ClassVar[KvSource]
    KV_SOURCE_DIRECT: _ClassVar[KvSource]
    KV_SOURCE_KVSTORE: _ClassVar[KvSource]
    KV_SOURCE_LOCAL: _ClassVar[KvSource]
KV_SOURCE_UNSPECIFIED: KvSource
KV_SOURCE_DIRECT: KvSource
KV_SOURCE_KVSTORE: KvSource
KV_SOURCE_LOCAL: KvSource

class ResetPrefixCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetPrefixCacheReply(_message.Message):
    __slots__ = ("blocks_freed",)
    BLOCKS_FREED_FIELD_NUMBER: _ClassVar[int]
    blocks_freed: int
    def __init__(self, blocks_freed: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "kv_source", "position_offset", "max_cache_budget_mb", "client_request_id", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_SOURCE_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_BUDGET_MB_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    kv_source: KvSource
    position_offset: int
    max_cache_budget_mb: float
    client_request_id: str
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., kv_source: _Optional[_Union[KvSource, str]] = ..., position_offset: _Optional[int] = ..., max_cache_budget_mb: _Optional[float] = ..., client_request_id: _Optional[str] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("kv_shm_host", "cached_tokens")
    KV_SHM_HOST_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kv_shm_host: str
    cached_tokens: int
    def __init__(self, kv_shm_host: _Optional[str] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class DecodeToken(_message.Message):
    __slots__ = ("token_id", "index", "logprob", "prompt_logprobs", "ends_output", "choice")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ENDS_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    index: int
    logprob: _common_pb2.TokenLogprob
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    ends_output: bool
    choice: int
    def __init__(self, token_id: _Optional[int] = ..., index: _Optional[int] = ..., logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., ends_output: _Optional[bool] = ..., choice: _Optional[int] = ...) -> None: ...

class DecodeFinished(_message.Message):
    __slots__ = ("reason", "completion_tokens", "choice")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    reason: _common_pb2.FinishReason
    completion_tokens: int
    choice: int
    def __init__(self, reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., completion_tokens: _Optional[int] = ..., choice: _Optional[int] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("accepted", "token", "finished")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    token: DecodeToken
    finished: DecodeFinished
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., token: _Optional[_Union[DecodeToken, _Mapping]] = ..., finished: _Optional[_Union[DecodeFinished, _Mapping]] = ...) -> None: ...

class TransferKvReply(_message.Message):
    __slots__ = ("bytes_received", "chunks_received")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    chunks_received: int
    def __init__(self, bytes_received: _Optional[int] = ..., chunks_received: _Optional[int] = ...) -> None: ...

class DecodeStats(_message.Message):
    __slots__ = ("active_requests", "awaiting_kv", "kv_bytes_held", "requests_total", "model", "blocks_used", "blocks_total", "block_size", "kv_pool_pressure", "running", "preemptions_total", "prefix_cached_blocks", "prefix_evictable_blocks", "prefix_evictions_total", "prefix_lookup_tokens", "prefix_hit_tokens", "kv_bytes_received_total", "kv_bytes_saved_total")
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    AWAITING_KV_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_EVICTABLE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_EVICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SAVED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    active_requests: int
    awaiting_kv: int
    kv_bytes_held: int
    requests_total: int
    model: _common_pb2.ModelInfo
    blocks_used: int
    blocks_total: int
    block_size: int
    kv_pool_pressure: float
    running: int
    preemptions_total: int
    prefix_cached_blocks: int
    prefix_evictable_blocks: int
    prefix_evictions_total: int
    prefix_lookup_tokens: int
    prefix_hit_tokens: int
    kv_bytes_received_total: int
    kv_bytes_saved_total: int
    def __init__(self, active_requests: _Optional[int] = ..., awaiting_kv: _Optional[int] = ..., kv_bytes_held: _Optional[int] = ..., requests_total: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., blocks_used: _Optional[int] = ..., blocks_total: _Optional[int] = ..., block_size: _Optional[int] = ..., kv_pool_pressure: _Optional[float] = ..., running: _Optional[int] = ..., preemptions_total: _Optional[int] = ..., prefix_cached_blocks: _Optional[int] = ..., prefix_evictable_blocks: _Optional[int] = ..., prefix_evictions_total: _Optional[int] = ..., prefix_lookup_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., kv_bytes_received_total: _Optional[int] = ..., kv_bytes_saved_total: _Optional[int] = ...) -> None: ...
