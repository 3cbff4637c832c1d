"""Serve many task deltas from one frozen backbone, with mixed-task batches (library first, HTTP second).

    engine.py    one backbone, named deltas, mixed batches (shared pass + own groups), generation
    routing.py   a generic row router per (place, row key); the math is the row site's (methods/base.RowSite)
    task.py      a delta applied around a structural clone of the backbone; the head view
    registry.py  the SQLite catalog + delta store that survives restarts
    batcher.py   dynamic batching over a bounded queue
    app.py       FastAPI: /v1/predict, /v1/tasks, admin, /healthz, /metrics, the page at /
    scheduler.py continuous batching for generation: one decode thread, requests join and leave between steps
    openai_api.py  OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models (openai_schema.py)
"""
