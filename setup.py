# Metadata lives in pyproject.toml. The packages are here because one import name spans three
# top-level folders: engine/, kernels/ and server/ install as pagedserve.engine,
# pagedserve.kernels and pagedserve.server (with pagedserve/__init__.py), and nothing else
# lands in site-packages. Subpackages are found, so a new one needs no edit here.
from setuptools import find_packages, setup

FOLDERS = ("engine", "kernels", "server")

setup(
    packages=["pagedserve"] + [f"pagedserve.{name}" for top in FOLDERS
                               for name in (top, *(f"{top}.{sub}" for sub in find_packages(top)))],
    package_dir={"pagedserve": "pagedserve", **{f"pagedserve.{top}": top for top in FOLDERS}},
)
