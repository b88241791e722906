"""Serving beyond one process: engine replicas on Ray Serve, prefix-aware routing, autoscaling.

Nothing here imports Ray until `serve --replicas` asks for it: single-process serving never loads it.
"""
