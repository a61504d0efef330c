"""`corral serve`: the control plane over HTTP (runs, approvals, traces, costs, the decision
log's status, the dashboard) with the gateway's OpenAI-compatible routes alongside.

```toml
[server]
master_key_env = "CORRAL_API_KEY"     # the key that sees every tenant
workflows = ["app/flows.py", "app.billing:invoice"]

[server.webhooks.github]              # POST /v1/hooks/github, signed with the secret
workflow = "triage"
secret_env = "GITHUB_HOOK_SECRET"
tenant = "acme"
```
"""

from ._app import Settings, Webhook, create_app

__all__ = ["Settings", "Webhook", "create_app"]
