"""The roles of FishChatServer v1, kept: gateway, msg_server, router, manager."""
