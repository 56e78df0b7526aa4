"""The dialogue format shared by the chat page and the OpenAI-compatible chat API.

Both talk to the model the same way (the original Petals chat's format), so a conversation
reads alike whichever way it arrives: a preamble, then turns separated by a blank line,
``Human: ...`` for the user and ``AI:...`` for the model.
"""

DEFAULT_PREAMBLE = "A human talks to a powerful AI that follows the human's instructions."
TURN_SEPARATOR = "\n\n"
HUMAN_PREFIX = "Human: "
AI_PREFIX = "AI:"
