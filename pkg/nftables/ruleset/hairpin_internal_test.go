package ruleset

import (
	"maps"
	"testing"
)

// TestHairpinRefsFold: counts that outgrow their base are folded into a new
// one, and neither the fold nor later writes change what an earlier table
// sees.
func TestHairpinRefsFold(t *testing.T) {
	key := func(i int) [16]byte { return [16]byte{15: byte(i), 14: byte(i >> 8)} }
	h := &hairpinRefs{delta: map[[16]byte]int32{}}
	for i := range 200 {
		h.delta[key(i)] = int32(1 + i%3)
	}
	counts := func(h *hairpinRefs) map[[16]byte]int32 {
		m := map[[16]byte]int32{}
		h.each(func(a [16]byte) { m[a] = h.get(a) })
		return m
	}
	want := counts(h)
	n := h.next()
	if len(n.base) != 200 || len(n.delta) != 0 {
		t.Fatalf("200 overrides over an empty base: next has base %d, delta %d; want folded", len(n.base), len(n.delta))
	}
	if got := counts(n); !maps.Equal(got, want) {
		t.Fatalf("counts changed by the fold")
	}
	// A small change is an override; the earlier table is unchanged.
	n.delta[key(1)], n.delta[key(500)] = 0, 7
	m := n.next()
	if len(m.delta) != 2 || m.get(key(1)) != 0 || m.get(key(500)) != 7 || m.get(key(2)) != want[key(2)] {
		t.Errorf("override copy: delta %d, counts %d %d %d", len(m.delta), m.get(key(1)), m.get(key(500)), m.get(key(2)))
	}
	if got := counts(h); !maps.Equal(got, want) {
		t.Errorf("the first table's counts changed")
	}
	if _, ok := counts(m)[key(1)]; ok {
		t.Errorf("an address whose count fell to 0 is still listed")
	}
}
