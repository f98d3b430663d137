"""Bundled Mistral-architecture inference server with continuous batching.

Run as a child process: `python -m local_backend serve --model embedded --port N`.
"""
