"""Conversation affinity decisions (the e2e multi-turn check is in tests/api/test_conformance.py)."""

from __future__ import annotations

from coe.affinity import AffinityConfig, ConversationAffinity, conversation_key, is_continuation

T1 = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Write a poem about rain."}]
T2 = T1 + [{"role": "assistant", "content": "Drip."}, {"role": "user", "content": "Another, about snow."}]


def cands(**scores):
    return [{"expert": k, "score": v} for k, v in scores.items()]


def test_turns_of_one_conversation_share_a_key_and_sessions_win():
    assert conversation_key(T1, None) == conversation_key(T2, None)
    other = [{"role": "user", "content": "Something else entirely."}]
    assert conversation_key(other, None) != conversation_key(T1, None)
    assert conversation_key(T1, "abc") == conversation_key(other, "abc") == "-|s:abc"
    assert not is_continuation(T1) and is_continuation(T2)


def test_sticky_unless_beaten_by_the_margin():
    clock = [0.0]
    a = ConversationAffinity(AffinityConfig(margin=0.1, ttl_s=100), clock=lambda: clock[0])
    k = conversation_key(T1, None)
    assert a.decide(k, "poet", cands(poet=0.8)).note == "new"
    a.remember(k, "poet")
    st = a.decide(k, "mathy", cands(mathy=0.65, poet=0.6))
    assert (st.expert, st.note) == ("poet", "sticky")  # 0.05 < margin
    st = a.decide(k, "mathy", cands(mathy=0.9, poet=0.6))
    assert st.expert == "mathy" and st.note.startswith("switched: 'mathy' scored 0.900")
    st = a.decide(k, "mathy", cands(mathy=0.9))
    assert st.expert == "mathy" and "not a candidate" in st.note
    clock[0] = 101  # idle past the TTL: forgotten
    assert a.decide(k, "mathy", cands(mathy=0.65, poet=0.6)).note == "new"
