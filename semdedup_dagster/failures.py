"""User errors as Dagster sees them: the one line the command line prints, as a `dagster.Failure`
(its description is what the UI shows), with the file and the clip in its metadata. Every op and
asset of semdedup is wrapped by `reports_user_errors`.

The engine's messages start with the path they are about (`<path>: <problem>`) and quote a
clip as `id '<id>'`; that is where the metadata comes from.
"""

import functools
import inspect
import re

from dagster import Failure, MetadataValue

from semdedup_core.errors import SemdedupError

_PATH = re.compile(r"^((?:[a-z][a-z0-9+.-]*://|/|\.{1,2}/|~/)[^\s:]*(?::[^\s:]+)*?):\s")
_CLIP = re.compile(r"\bid '([^']*)'")


def user_failure(exc: BaseException) -> Failure:
    """The Failure for a user error: one line, plus `path` and `clip` metadata when named."""
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, SemdedupError):  # pyarrow/boto add lines of detail after the first
        text = text.splitlines()[0]
    metadata = {}
    if path := _PATH.match(text):
        metadata["path"] = MetadataValue.path(path.group(1))
    if clip := _CLIP.search(text):
        metadata["clip"] = clip.group(1)
    return Failure(description=text, metadata=metadata, allow_retries=False)


# What a user can act on: our own errors, and I/O errors (an unreachable S3 endpoint, a file
# removed under a running step), whose first line names the path.
USER_ERRORS = (SemdedupError, OSError)


def reports_user_errors(fn):
    """Wrap an op or asset body: a user error becomes `user_failure(...)`, raised without the
    engine's stack (the message says what to change; a trace would bury it)."""

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as exc:
                raise user_failure(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise user_failure(exc) from None
    return wrapper
