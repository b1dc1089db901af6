"""Prefect flows and deployments for d2v: the only package that imports prefect.

``pipelines.flows`` holds one flow per pipeline stage (``prepare`` ... ``report``) and ``pipeline`` for the
whole chain; ``prefect.yaml`` at the project root declares their deployments. See docs/prefect.md.
"""
