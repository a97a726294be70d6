"""Data: the PKT chat-messages format, prompt rendering/tokenisation, and the task registry."""
