"""The instruction an LLM2Vec model gets for each MTEB task and side, as LLM2Vec's paper chose.

    instruction_for("SciFact", "Retrieval", metadata_prompt, "query")   # "Given a scientific ...:"
    instruction_for("SciFact", "Retrieval", metadata_prompt, "document")  # "" (no instruction)
    instruction_for("STS16", "STS", None, None)                          # "Retrieve semantically
                                                                         #  similar text:"

LLM2Vec's evaluation (its paper, section 4 and appendix; its repository's MTEB instruction
table) gives every text of a task the task's instruction except the documents of a retrieval
corpus, which get none. The instruction is, in order: LLM2Vec's own entry for the task
(`TASK_INSTRUCTIONS`), LLM2Vec's entry for the task type (`TYPE_INSTRUCTIONS`: STS,
Summarization), else the task's own instruction in its MTEB metadata (`TaskMetadata.prompt`,
which for MTEB's English tasks holds the E5-Mistral instructions LLM2Vec's paper reused; a dict
there gives one per side). It is written as llm2vec writes instructions: stripped, a trailing
period dropped, ending in a colon.

Pure data and string functions: nothing here imports mteb.
"""

from __future__ import annotations

from collections.abc import Mapping

# Sides of an asymmetric task (MTEB's PromptType values).
QUERY = "query"
DOCUMENT = "document"

_CQADUPSTACK = (
    "Given a question, retrieve detailed question descriptions from Stackexchange that are "
    "duplicates to the given question"
)
_CQADUPSTACK_FORUMS = ("Android", "English", "Gaming", "Gis", "Mathematica", "Physics",
                       "Programmers", "Stats", "Tex", "Unix", "Webmasters",
                       "Wordpress")  # fmt: skip

# LLM2Vec's per-task instructions (its repository's MTEB table; queries only for retrieval).
TASK_INSTRUCTIONS: dict[str, str] = {
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or "
    "refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to "
    "the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the "
    "given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the "
    "question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    **{f"CQADupstack{forum}Retrieval": _CQADUPSTACK for forum in _CQADUPSTACK_FORUMS},
}

# LLM2Vec's instructions for every task of a type (MTEB's task types).
TYPE_INSTRUCTIONS: dict[str, str] = {
    "STS": "Retrieve semantically similar text",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",
}


def llm2vec_format(instruction: str) -> str:
    """An instruction as llm2vec writes them: stripped, ending in ":" ("" stays "")."""
    text = instruction.strip()
    if not text or text.endswith(":"):
        return text
    return text.rstrip(".").rstrip() + ":"


def instruction_for(task_name: str, task_type: str | None, metadata_prompt=None,
                    side: str | None = None) -> str:  # fmt: skip
    """The llm2vec instruction for one MTEB task and side ("" for none).

    task_name, task_type: the task's MTEB name and type. metadata_prompt: the task's own
    `TaskMetadata.prompt` (a string, a {"query": ..., "document": ...} dict, or None). side:
    "query", "document" or None (a symmetric task: STS, classification, clustering...).
    Documents (a retrieval or reranking corpus) get none, as in LLM2Vec's evaluation."""
    if side == DOCUMENT:
        return ""
    if task_name in TASK_INSTRUCTIONS:
        return llm2vec_format(TASK_INSTRUCTIONS[task_name])
    if task_type in TYPE_INSTRUCTIONS:
        return llm2vec_format(TYPE_INSTRUCTIONS[task_type])
    if isinstance(metadata_prompt, Mapping):
        metadata_prompt = metadata_prompt.get(side or QUERY)
    if isinstance(metadata_prompt, str):
        return llm2vec_format(metadata_prompt)
    return ""


def named_prompts() -> dict[str, str]:
    """The table as sentence-transformers prompt names that MTEB looks up: "<Task>-query" for a
    task's queries, "<Type>" for every text of a task type (see l2v_models.export); values are
    the formatted instructions."""
    out = {f"{name}-{QUERY}": llm2vec_format(text) for name, text in TASK_INSTRUCTIONS.items()}
    out.update({name: llm2vec_format(text) for name, text in TYPE_INSTRUCTIONS.items()})
    return out
