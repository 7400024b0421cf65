from conftest import chat_records, jsonl


def test_smoke(ws, monkeypatch):
    train = ws.put("data/train.jsonl", jsonl(chat_records(40)))
    result = ws.run(ws.config(train), monkeypatch)
    print(result.summary)
    assert result.code == 0
