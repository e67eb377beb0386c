"""The asyncio shell: server, client, replay, CLI, logs, metrics, status, netlink, systemd."""
