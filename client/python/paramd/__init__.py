"""paramd: the Python client of the paramd parameter server.

    import paramd
    client = paramd.Client("http://ps:50051")
    client = paramd.Client("https://ps:50051", token_file="/run/secrets/paramd-token",
                           tls=paramd.TLS(ca_cert="ca.pem", cert="worker.pem", key="worker.key"))

`paramd.torch` (imported on its own, needs torch) holds the optimizer a
PyTorch training loop uses in place of `torch.optim`.
"""

from .client import Client, Exported, InitResult, Membership, OptimizerState, ParamState, Pulled, PushResult
from .credentials import TLS
from .config import SGD, Adam, AdamW, ClipGradNorm, Constant, CosineAnnealing, Optimizer, Schedule, WarmupCosine
from .options import JobOptions
from .errors import (
    Aborted,
    DeadlineExceeded,
    EarlyPush,
    Error,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    JobMismatch,
    NotFound,
    NotMember,
    PermissionDenied,
    ResourceExhausted,
    StalePush,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Exported",
    "InitResult",
    "Membership",
    "OptimizerState",
    "ParamState",
    "Pulled",
    "PushResult",
    "TLS",
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "Schedule",
    "Constant",
    "WarmupCosine",
    "CosineAnnealing",
    "ClipGradNorm",
    "JobOptions",
    "Error",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "JobMismatch",
    "StalePush",
    "EarlyPush",
    "NotMember",
    "DeadlineExceeded",
    "Unavailable",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "Aborted",
    "Internal",
]
