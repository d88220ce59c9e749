"""dreamo_async: an asyncio-first client for Vtrix's Spark DreamO image API.

Everything public is importable from here; the submodules are the map of the
implementation (see DESIGN.md).
"""

from .__about__ import __version__
from ._types import NOT_GIVEN, NotGiven
from .budget import Spending
from .bulk import BatchItem, BatchProgress
from .client import ClientStatistics, DreamOClient
from .errors import (
    PROVIDER_ERROR_CODES,
    APIConnectionError,
    APIError,
    AuthenticationError,
    BudgetExceededError,
    ClientClosedError,
    ConfigurationError,
    CreateOutcomeUnknownError,
    DownloadError,
    DreamOError,
    DreamOWarning,
    ImageError,
    InvalidRequestError,
    JobsFileError,
    JournalError,
    LimitsBackendError,
    MoneyState,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TaskFailedError,
    TaskTimeoutError,
)
from .images import ImageInfo, ImageSource
from .limits import DEFAULT_LIMITS, CheckPolicy, Limits
from .models import GenerationResult, OutputImage, Task, TaskError, TaskStatus, Usage
from .polling import PollPolicy
from .ratelimit import (
    AdaptiveLimiter,
    JobSlots,
    LimitsBackend,
    LocalLimits,
    Priority,
    RateLimiter,
    TokenBucketLimiter,
    UnlimitedLimiter,
)
from .redis_limits import RedisLimits
from .request import (
    MULTI_IP_MODEL,
    SINGLE_IMAGE_MODEL,
    SIZE_PRESETS,
    GenerationParams,
    GenerationRequest,
    RefType,
    RephraserLevel,
)
from .retry import RetryPolicy, set_testing
from .web import CallerDisconnectedError, cancel_on_disconnect

__all__ = [
    "DEFAULT_LIMITS",
    "MULTI_IP_MODEL",
    "NOT_GIVEN",
    "PROVIDER_ERROR_CODES",
    "SINGLE_IMAGE_MODEL",
    "SIZE_PRESETS",
    "APIConnectionError",
    "APIError",
    "AdaptiveLimiter",
    "AuthenticationError",
    "BatchItem",
    "BatchProgress",
    "BudgetExceededError",
    "CallerDisconnectedError",
    "CheckPolicy",
    "ClientClosedError",
    "ClientStatistics",
    "ConfigurationError",
    "CreateOutcomeUnknownError",
    "DownloadError",
    "DreamOClient",
    "DreamOError",
    "DreamOWarning",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "ImageError",
    "ImageInfo",
    "ImageSource",
    "InvalidRequestError",
    "JobSlots",
    "JobsFileError",
    "JournalError",
    "Limits",
    "LimitsBackend",
    "LimitsBackendError",
    "LocalLimits",
    "MoneyState",
    "NotFoundError",
    "NotGiven",
    "OutputImage",
    "PermissionDeniedError",
    "PollPolicy",
    "Priority",
    "RateLimitError",
    "RateLimiter",
    "RedisLimits",
    "RefType",
    "RephraserLevel",
    "ResponseFormatError",
    "RetryPolicy",
    "ServerError",
    "Spending",
    "Task",
    "TaskError",
    "TaskFailedError",
    "TaskStatus",
    "TaskTimeoutError",
    "TokenBucketLimiter",
    "UnlimitedLimiter",
    "Usage",
    "__version__",
    "cancel_on_disconnect",
    "set_testing",
]
