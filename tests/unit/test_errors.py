"""The exception tree: one root, stdlib bases where callers expect them, an exact __all__."""

from __future__ import annotations

import inspect

from erllama import errors


def test_all_lists_every_exception_sorted() -> None:
    defined = {n for n, o in vars(errors).items() if inspect.isclass(o) and issubclass(o, BaseException)}
    assert set(errors.__all__) == defined
    assert errors.__all__ == sorted(errors.__all__)


def test_every_error_derives_from_the_root() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ErllamaError), name


def test_stdlib_bases() -> None:
    assert issubclass(errors.TokenIdError, ValueError)
    assert issubclass(errors.ClosedError, ValueError)
    assert issubclass(errors.ModelLoadError, OSError)
    assert issubclass(errors.LibraryError, ImportError)
    assert issubclass(errors.KVCacheFullError, errors.DecodeError)


def test_docstring_draws_every_class() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, name


def test_structured_fields() -> None:
    e = errors.TokenIdError(70000, 49152)
    assert (e.token, e.n_vocab) == (70000, 49152)
    assert "70000" in str(e)
    assert errors.DecodeAbortedError("x", 2).code == 2
