"""Maps the top-level folders to the import packages nablagfn.<folder> (see pyproject.toml).

Sub-packages are found automatically, so a new folder with an __init__.py needs no edit here.
"""
from setuptools import find_packages, setup

ROOTS = {"nablagfn": "nablagfn", "nablagfn.common": "common", "nablagfn.actors": "actors",
         "nablagfn.learner": "learner", "nablagfn.rewards_service": "rewards_service"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=ROOTS, package_data={"nablagfn": ["presets/*.yaml"]})
