"""The real all-MiniLM-L6-v2 (pulled once into $TOKENMILL_HOME), transformers' reference and varied sentences."""

from pathlib import Path

import pytest
import torch

from tokenmill.loader import catalog

# 64 sentences of every length and kind an embedding endpoint sees: words, questions, code, numbers, accents,
# scripts without spaces, emoji, and a few long enough to make padding matter in a batch.
SENTENCES = [
    "Hello.",
    "a",
    "The cat sat on the mat.",
    "How do I reset my password?",
    "Quarterly revenue rose 12.5% to $4.2 billion, beating estimates.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10;",
    "Café, naïve, résumé, jalapeño: accents everywhere.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "I love pizza 🍕 and sushi 🍣!",
    "ERROR 404: page not found",
    "the the the the the the the the",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good book on distributed systems?",
    "My flight was delayed by three hours and nobody told us why.",
    "E = mc^2",
    "https://example.com/path?query=1&other=two#fragment",
    "The mitochondria is the powerhouse of the cell.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "  leading and trailing spaces  ",
    "ALL CAPS SENTENCE ABOUT NOTHING IN PARTICULAR",
    "Tabs\tand\nnewlines\nin the middle.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "Is it going to rain tomorrow in Seattle?",
    "The quick brown fox jumps over the lazy dog.",
    "Neural networks learn representations by gradient descent on a loss function.",
    "Où est la bibliothèque la plus proche ?",
    "¿Dónde está el baño?",
    "Das ist ein sehr langes deutsches Kompositum: Donaudampfschifffahrtsgesellschaftskapitän.",
    "He said, \"don't go there\" — and then he went there anyway.",
    "The patient presented with acute abdominal pain radiating to the back.",
    "Buy now!!! Limited offer!!! Click here!!!",
    "The Treaty of Westphalia was signed in 1648.",
    "sudo apt-get install build-essential",
    "What is the capital of Australia? It is Canberra, not Sydney.",
    "Water boils at 100 degrees Celsius at sea level.",
    "I'm not sure this is the right approach, but let's try it.",
    "Thank you so much for your help yesterday!",
    "The stock market crashed in 1929, leading to the Great Depression.",
    "Please find attached the invoice for March.",
    "Recursion: see recursion.",
    "A journey of a thousand miles begins with a single step.",
    "x",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "The Eiffel Tower is 330 metres tall.",
    "How many calories are in a banana?",
    "Rust's borrow checker prevents data races at compile time.",
    "She sells sea shells by the sea shore.",
    "Climate change is driving more frequent extreme weather events.",
    "Meeting moved to 3pm; bring the Q3 slides.",
    "우리는 내일 서울에 갑니다.",
    "مرحبا بالعالم",
    "The referee blew the whistle and the match was over.",
    "To be, or not to be, that is the question.",
    " ".join(["Long documents exercise the padding mask because they are much longer than the rest."] * 6),
    " ".join(["Retrieval systems embed every passage of a corpus once and every query as it arrives."] * 10),
    "A review: " + "great product, fast shipping, would buy again. " * 12,
    "The committee, after lengthy deliberation over several sessions spanning three weeks, concluded that the "
    "proposal, although ambitious, lacked the funding, the staffing and the political support it needed.",
    "Kubernetes schedules pods onto nodes according to resource requests, limits, affinities and taints.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface.",
    "?!",
    "Embeddings map text to vectors so that similar meanings lie close together.",
    "Goodbye.",
]
assert len(SENTENCES) == 64


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    """The 64 varied sentences."""
    return SENTENCES


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder, pulled through the catalog if the cache lacks it."""
    return catalog.pull("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def reference(minilm_path: Path):
    """transformers' BertModel with sentence-transformers' mean pooling and normalization: texts → [n, 384]."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(minilm_path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))

    @torch.inference_mode()
    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for text in texts:  # one at a time: no padding can touch the reference
            encoded = tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            out.append(torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0])
        return torch.stack(out)

    return embed
