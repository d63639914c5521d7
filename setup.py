"""The wheel's packages: everything under src/, plus conf/ as the package data ``heatmapbench/conf``.

conf/ stays at the top of the repository (the Hydra layout); an installed heatmapbench finds its
configs inside the package (``heatmapbench.registry.conf_dir``). pyproject.toml cannot add a
package from another folder next to an automatic package search, hence this file; every other
setting lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

# conf/ and each config group folder in it are data-only packages (YAML, no __init__.py).
CONF = ["heatmapbench.conf", *(f"heatmapbench.conf.{d.name}" for d in sorted(Path("conf").iterdir()) if d.is_dir())]

setup(
    packages=[*find_packages("src"), *CONF],
    package_dir={"": "src", "heatmapbench.conf": "conf"},
    package_data={name: ["*.yaml"] for name in CONF},
)
