"""`POST /v1/classify`: the label and every label's probability, scored as `softprompt classify` scores."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from softprompt.serve.errors import ServeError
from softprompt.serve.http import checked_body, resolve_model, run_job
from softprompt.serve.schemas import ClassifyRequest


async def classify(request: Request) -> Response:
    server, body = await checked_body(request, ClassifyRequest)
    adapter = await resolve_model(server, body.model)
    if adapter is None:
        raise ServeError(
            "classify needs an adapter trained for classification, not the base model.", param="model"
        )
    engine = server.engine
    texts = body.texts
    results = await run_job(server, lambda: engine.classify(adapter, texts, body.max_length))
    server.metrics.request("classify", body.model, 200)
    data = [
        {"index": i, "label": r["label"], "probs": r["probs"], "text": t}
        for i, (t, r) in enumerate(zip(texts, results))
    ]
    return JSONResponse({"object": "list", "model": body.model, "data": data})


ROUTES = [
    ("POST", "/v1/classify", classify),
]
