"""PEP 517 build backend: setuptools, built against the torch already installed.

`pip install .` builds in an isolated environment whose sys.path hides the interpreter's site-packages.
Listing torch in build-system.requires would make pip download a second torch into that environment,
possibly of another version or CUDA flavour than the one the extension must load into. Instead, the
site-packages of the interpreter running pip are appended to sys.path (appended, so that the build
requirements pip installed in isolation still take precedence). With --no-build-isolation this is a no-op.
"""

import os
import site
import sys
import sysconfig


def _expose_installed_torch() -> None:
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"]]
    user_site = site.getusersitepackages()
    if site.ENABLE_USER_SITE is not False and os.path.isdir(user_site):
        candidates.append(user_site)
    for path in candidates:
        if path not in sys.path:
            sys.path.append(path)
    try:
        import torch  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "orthrus: install torch first (for example `pip install torch`, see https://pytorch.org), "
            "then run `pip install .` again. The C++/CUDA extension is built against the installed torch. "
            f"(import failed in {sys.executable}: {error})"
        ) from error


_expose_installed_torch()

from setuptools.build_meta import *  # noqa: E402,F401,F403  (re-export every PEP 517 hook)
