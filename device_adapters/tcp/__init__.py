"""The TCP adapter: FishChatServer v1 framing and commands, plus token-session extensions."""
