"""gunicorn settings for the inference service: one worker (sessions live in its memory), many threads."""

from services.common.gunicorn.settings import service_config
from services.inference.settings import InferenceSettings


def torch_environment(settings: InferenceSettings) -> dict[str, str]:
    """torch sizes its intra-op pool once, when the worker imports it: set here, every thread of the
    worker gets TORCH_THREADS (torch.set_num_threads from one thread would miss the request threads)."""
    return {"OMP_NUM_THREADS": str(settings.torch_threads), "MKL_NUM_THREADS": str(settings.torch_threads)}


globals().update(
    service_config("inference", InferenceSettings.from_env, "services.inference.app:create_app()", torch_environment)
)


def worker_exit(server, worker):
    """Close every inference session before the worker exits (SIGTERM, scale-down)."""
    from services.inference.app import shutdown

    shutdown()


def post_worker_init(worker):
    """The memory-tracing debug hook (services/common/gunicorn/memtrace.py): off unless TRACEMALLOC_DIR is set."""
    from services.common.gunicorn import memtrace

    memtrace.install()
