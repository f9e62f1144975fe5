"""The package's metadata is all in pyproject.toml. This shim remains for builders
without a PEP 517 frontend: the RPM spec's fallback (where Fedora's %pyproject
macros are missing, e.g. Debian's rpmbuild in CI) runs `setup.py build/install`."""

from setuptools import setup

setup()
