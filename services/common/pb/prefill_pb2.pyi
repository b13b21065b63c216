from services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "decode_address", "store_kv", "position_offset", "transfer_attempt", "client_request_id", "known_first_token", "decode_kv_shm_host", "known_choice_first_tokens", "cache_salt", "decode_cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_KV_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DECODE_KV_SHM_HOST_FIELD_NUMBER: _ClassVar[int]
    KNOWN_CHOICE_FIRST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    DECODE_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    decode_address: str
    store_kv: bool
    position_offset: int
    transfer_attempt: int
    client_request_id: str
    known_first_token: int
    decode_kv_shm_host: str
    known_choice_first_tokens: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    decode_cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., decode_address: _Optional[str] = ..., store_kv: _Optional[bool] = ..., position_offset: _Optional[int] = ..., transfer_attempt: _Optional[int] = ..., client_request_id: _Optional[str] = ..., known_first_token: _Optional[int] = ..., decode_kv_shm_host: _Optional[str] = ..., known_choice_first_tokens: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ..., decode_cached_tokens: _Optional[int] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "logprob", "prompt_logprobs", "ends_output", "choice")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ENDS_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: _common_pb2.TokenLogprob
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    ends_output: bool
    choice: int
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., ends_output: _Optional[bool] = ..., choice: _Optional[int] = ...) -> None: ...

class PrefillDone(_message.Message):
    __slots__ = ("kv_bytes", "chunk_count", "forward_seconds", "transfer_seconds", "stored", "handoff_seconds", "kv_transport", "cached_tokens")
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kv_bytes: int
    chunk_count: int
    forward_seconds: float
    transfer_seconds: float
    stored: bool
    handoff_seconds: float
    kv_transport: str
    cached_tokens: int
    def __init__(self, kv_bytes: _Optional[int] = ..., chunk_count: _Optional[int] = ..., forward_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., stored: _Optional[bool] = ..., handoff_seconds: _Optional[float] = ..., kv_transport: _Optional[str] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("first_token", "done")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    first_token: FirstToken
    done: PrefillDone
    def __init__(self, first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., done: _Optional[_Union[PrefillDone, _Mapping]] = ...) -> None: ...

class PrefillStats(_message.Message):
    __slots__ = ("active_requests", "kv_bytes_held", "requests_total", "model", "shm_transfers_total", "prefix_lookup_tokens_total", "prefix_hit_tokens_total", "prefix_cache_blocks")
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHM_TRANSFERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LOOKUP_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    active_requests: int
    kv_bytes_held: int
    requests_total: int
    model: _common_pb2.ModelInfo
    shm_transfers_total: int
    prefix_lookup_tokens_total: int
    prefix_hit_tokens_total: int
    prefix_cache_blocks: int
    def __init__(self, active_requests: _Optional[int] = ..., kv_bytes_held: _Optional[int] = ..., requests_total: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., shm_transfers_total: _Optional[int] = ..., prefix_lookup_tokens_total: _Optional[int] = ..., prefix_hit_tokens_total: _Optional[int] = ..., prefix_cache_blocks: _Optional[int] = ...) -> None: ...
