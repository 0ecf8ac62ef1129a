"""Packaging. The CUDA extension build is added by the cuda-backend work (issue 3)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["gapkern", "gapkern.*"]))
