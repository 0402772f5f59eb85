"""kernels.hub_kernels_clash: the Hub's package named `kernels` (transformers >= 5.25 needs it) is detected."""

import importlib.metadata

import kernels


def test_clash_named_when_the_hub_package_is_installed(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        return "0.19.1" if name == "kernels" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    msg = kernels.hub_kernels_clash()
    assert msg and "0.19.1" in msg and "pip uninstall -y kernels" in msg and "\n" not in msg


def test_no_clash_without_it(monkeypatch):
    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert kernels.hub_kernels_clash() is None
