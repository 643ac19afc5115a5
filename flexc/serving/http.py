"""``vllm serve``'s budget endpoint (entry point group ``vllm.endpoint_plugins``, name ``flexc``).

vLLM loads endpoint plugins only when named in ``VLLM_PLUGINS``; ``VLLM_PLUGINS=flexc`` allows
both this endpoint and flexc's model plugin (same name in both groups)::

    VLLM_PLUGINS=flexc vllm serve runs/x/nested --hf-overrides '{"flexc_budget": 0.75}'
    curl localhost:8000/flexc/budget                                   # the state
    curl -X POST localhost:8000/flexc/budget -d '{"keep": 0.5}' -H 'Content-Type: application/json'
    curl -X POST localhost:8000/flexc/budget -d '{"keep": 0.5, "adaptive": true}' -H 'Content-Type: application/json'

A switch goes to every worker through the engine's ``collective_rpc`` (the worker method the
model plugin installs) and resets the prefix cache with running requests preempted and
recomputed at the new budget (:func:`flexc.serving.control.set_budget_async`).
"""


from typing import Any

ROUTE = "/flexc/budget"


class BudgetEndpoint:
    name = "flexc"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import Request
        from fastapi.responses import JSONResponse

        async def _call(request: Request, keep: float | None, adaptive: bool = False) -> JSONResponse:
            from flexc.serving.control import get_budget_async, set_budget_async

            engine = getattr(request.app.state, "flexc_engine", None)
            if engine is None:
                return JSONResponse({"error": "no engine behind this server"}, status_code=503)
            try:
                state = await (get_budget_async(engine) if keep is None else set_budget_async(engine, keep, adaptive))
            except Exception as exc:  # noqa: BLE001 -- the worker's message (unknown budget, sliced, ...)
                return JSONResponse({"error": _message(exc)}, status_code=400)
            return JSONResponse(_jsonable(state))

        @app.get(ROUTE)
        async def flexc_get_budget(request: Request):
            return await _call(request, None)

        @app.post(ROUTE)
        async def flexc_set_budget(request: Request):
            try:
                body = await request.json()
            except ValueError:
                body = None
            keep = body.get("keep") if isinstance(body, dict) else None
            adaptive = body.get("adaptive", False) if isinstance(body, dict) else False
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not isinstance(adaptive, bool):
                return JSONResponse({"error": 'POST a JSON object {"keep": <keep ratio>}, e.g. {"keep": 0.5}, and '
                                     '"adaptive": true for the token-adaptive policy'}, status_code=400)
            return await _call(request, float(keep), adaptive)

    async def init_state(self, engine_client, state, args) -> None:
        state.flexc_engine = engine_client


def _message(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    out["widths"] = {str(k): v for k, v in state.get("widths", {}).items()}
    return out


def endpoint() -> BudgetEndpoint:
    return BudgetEndpoint()
