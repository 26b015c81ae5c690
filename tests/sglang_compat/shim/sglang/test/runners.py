"""sglang.test.runners: the one constant the OpenAI-server tests import.

TEST_RERANK_QUERY_DOCS: entry 0 is a query with one document, entry 1 a query with two (the rerank tests
check the number of results against that). The texts are our own.
"""

TEST_RERANK_QUERY_DOCS = [
    {
        "query": "Which city is the capital of France?",
        "documents": ["Paris is the capital and largest city of France."],
    },
    {
        "query": "How do plants make their food?",
        "documents": [
            "Plants turn light, water and carbon dioxide into sugar by photosynthesis.",
            "The Pacific is the largest ocean on Earth.",
        ],
    },
]
