"""HTTP routes. Each module holds one `router` (APIRouter) whose handlers parse, call one service, and pick the
response type; `claas.api.build_app` includes them."""
