// A dialogue written in a model's chat format (GET /v1/models' `chat`): the whole transcript for a
// new session, the next turn for a session that holds the dialogue so far, and what must precede
// that turn after an answer.

function turnText(format, message) {
  return message.role === "human"
    ? format.user_start + message.text + format.user_end
    : format.assistant_start + message.text + format.assistant_end;
}

// The whole dialogue (`messages` ends with the user's), for a new session.
export function transcript(format, systemPrompt, messages) {
  const system = systemPrompt ? format.system_start + systemPrompt + format.system_end : "";
  return system + messages.map((message) => turnText(format, message)).join("") + format.assistant_start;
}

// The user's next turn in a session that holds the dialogue before it.
export function nextTurn(format, continuation, text) {
  return continuation + text + format.user_end + format.assistant_start;
}

// What must precede the next user message in the session: the end of the answer and the start of
// the user's turn, less what the model already said (the stop sequence, or its end-of-turn token).
export function continuation(format, done) {
  const between = format.assistant_end + format.user_start;
  const said = { stop: done.stop_sequence, eos: format.end_of_turn }[done.finish_reason] || "";
  return said && between.startsWith(said) ? between.slice(said.length) : between;
}
