"""tests/conftest.py stops a pytest process after a CUDA error that loses the CUDA context (the first GPU run lost
64 tests to one illegal memory access): shown here with a raised error of the same text, in a pytester run."""

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


def run_after_error(pytester, monkeypatch, message):
    """A run of two tests under our conftest, one process: the first raises RuntimeError(message)."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=f"""
        def test_kernel():
            raise RuntimeError({message!r})

        def test_after():
            pass
    """)
    return pytester.runpytest("-p", "no:cacheprovider")


def test_a_lost_cuda_context_stops_the_session(pytester, monkeypatch):
    result = run_after_error(pytester, monkeypatch, "CUDA error: an illegal memory access was encountered\nmore")
    result.assert_outcomes(failed=1)  # test_after never ran
    result.stdout.fnmatch_lines(["*test_kernel: CUDA error: an illegal memory access was encountered; the CUDA "
                                 "context is lost*"])


def test_other_failures_do_not_stop_it(pytester, monkeypatch):
    run_after_error(pytester, monkeypatch, "CUDA error: out of memory").assert_outcomes(failed=1, passed=1)
