"""Metadata lives in setup.cfg; this file only lets older tools build the package."""
from setuptools import setup

setup()
