"""The chat bot: Bot Framework endpoint for Teams and Web Chat, answering with the fine-tuned Phi-3.

phi3_bot.py            the ActivityHandler (what to say): commands, history, typing, splitting
adapter.py             host wiring: CloudAdapter, app identity settings, token checks, HTTP error mapping
activity_json.py       activities to and from JSON as msrest does it, without its per-turn cost
function_blueprint.py  POST /api/messages and the Durable delivery of slow answers
routes.py              flow (Prompt flow) or direct (scoring client) to the model
endpoints.py           which endpoint answers, and its key (from the backend, memory only)
answers.py             one turn to one answer; failures worded for people and logged
conversation.py        per-conversation memory and its bound
messages.py            replies: markdown, split under Teams' size limit, cheap to copy
proactive.py           acknowledge now, answer later with continue_conversation
dedupe.py              retried activities answered once
storage.py             memory or blob (azure-storage-blob) state store
runtime.py             builds all of the above once, from settings
"""
