from services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutRequest(_message.Message):
    __slots__ = ("namespace", "key", "value", "ttl_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    value: bytes
    ttl_seconds: int
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    def __init__(self, evicted: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "key", "host_identity")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    HOST_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    host_identity: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., host_identity: _Optional[str] = ...) -> None: ...

class ShmValue(_message.Message):
    __slots__ = ("segment", "length")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    segment: str
    length: int
    def __init__(self, segment: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("value", "shm")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    value: bytes
    shm: ShmValue
    def __init__(self, value: _Optional[bytes] = ..., shm: _Optional[_Union[ShmValue, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "keys", "prefix")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class KvStoreStats(_message.Message):
    __slots__ = ("backend", "entries", "bytes_used", "byte_budget", "evictions_total", "shm_gets_total")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHM_GETS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    backend: str
    entries: int
    bytes_used: int
    byte_budget: int
    evictions_total: int
    shm_gets_total: int
    def __init__(self, backend: _Optional[str] = ..., entries: _Optional[int] = ..., bytes_used: _Optional[int] = ..., byte_budget: _Optional[int] = ..., evictions_total: _Optional[int] = ..., shm_gets_total: _Optional[int] = ...) -> None: ...
