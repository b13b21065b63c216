from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_DTYPE_UNSPECIFIED: _ClassVar[KvDtype]
    KV_DTYPE_FLOAT32: _ClassVar[KvDtype]
    KV_DTYPE_BFLOAT16: _ClassVar[KvDtype]
    KV_DTYPE_FLOAT16: _ClassVar[KvDtype]

class KvEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_ENCODING_UNSPECIFIED: _ClassVar[KvEncoding]
    KV_ENCODING_RAW: _ClassVar[KvEncoding]
    KV_ENCODING_FP8_E4M3: _ClassVar[KvEncoding]

class KvChecksum(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_CHECKSUM_UNSPECIFIED: _ClassVar[KvChecksum]
    KV_CHECKSUM_CRC32: _ClassVar[KvChecksum]
    KV_CHECKSUM_CRC32C: _ClassVar[KvChecksum]
KV_DTYPE_UNSPECIFIED: KvDtype
KV_DTYPE_FLOAT32: KvDtype
KV_DTYPE_BFLOAT16: KvDtype
KV_DTYPE_FLOAT16: KvDtype
KV_ENCODING_UNSPECIFIED: KvEncoding
KV_ENCODING_RAW: KvEncoding
KV_ENCODING_FP8_E4M3: KvEncoding
KV_CHECKSUM_UNSPECIFIED: KvChecksum
KV_CHECKSUM_CRC32: KvChecksum
KV_CHECKSUM_CRC32C: KvChecksum

class KvLayout(_message.Message):
    __slots__ = ("request_id", "model_fingerprint", "num_layers", "num_kv_heads", "head_dim", "num_tokens", "chunk_tokens", "chunk_layers", "dtype", "encoding", "transfer_attempt", "chunks_in_kvstore", "checksum", "shm_segment", "token_start")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_IN_KVSTORE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SHM_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    chunk_tokens: int
    chunk_layers: int
    dtype: KvDtype
    encoding: KvEncoding
    transfer_attempt: int
    chunks_in_kvstore: bool
    checksum: KvChecksum
    shm_segment: str
    token_start: int
    def __init__(self, request_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., num_tokens: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., chunk_layers: _Optional[int] = ..., dtype: _Optional[_Union[KvDtype, str]] = ..., encoding: _Optional[_Union[KvEncoding, str]] = ..., transfer_attempt: _Optional[int] = ..., chunks_in_kvstore: _Optional[bool] = ..., checksum: _Optional[_Union[KvChecksum, str]] = ..., shm_segment: _Optional[str] = ..., token_start: _Optional[int] = ...) -> None: ...

class KvShmSlice(_message.Message):
    __slots__ = ("segment", "offset", "length")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    length: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("request_id", "model_fingerprint", "index", "layer_start", "layer_end", "token_start", "token_end", "dtype", "encoding", "shape", "byte_length", "crc32", "data", "crc32c", "scales", "shm")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_fingerprint: str
    index: int
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    dtype: KvDtype
    encoding: KvEncoding
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    crc32: int
    data: bytes
    crc32c: int
    scales: bytes
    shm: KvShmSlice
    def __init__(self, request_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., dtype: _Optional[_Union[KvDtype, str]] = ..., encoding: _Optional[_Union[KvEncoding, str]] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ..., crc32: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., scales: _Optional[bytes] = ..., shm: _Optional[_Union[KvShmSlice, _Mapping]] = ...) -> None: ...

class KvTransferEnd(_message.Message):
    __slots__ = ("request_id", "chunk_count", "first_token", "forward_end_unix_nanos", "choice_first_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FORWARD_END_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIRST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk_count: int
    first_token: int
    forward_end_unix_nanos: int
    choice_first_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., chunk_count: _Optional[int] = ..., first_token: _Optional[int] = ..., forward_end_unix_nanos: _Optional[int] = ..., choice_first_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class KvTransferMessage(_message.Message):
    __slots__ = ("layout", "chunk", "end")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    layout: KvLayout
    chunk: KvChunk
    end: KvTransferEnd
    def __init__(self, layout: _Optional[_Union[KvLayout, _Mapping]] = ..., chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., end: _Optional[_Union[KvTransferEnd, _Mapping]] = ...) -> None: ...
