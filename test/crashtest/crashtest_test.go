package crashtest

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
)

func snap(n int) *model.Snapshot {
	s := &model.Snapshot{Services: map[model.ServicePortName]*model.ServicePort{}}
	for i := 0; i < n; i++ {
		sp := &model.ServicePort{
			Name:       model.ServicePortName{Namespace: "scale", Name: fmt.Sprintf("svc-%d", i), Protocol: model.TCP},
			ClusterIPs: []netip.Addr{netip.AddrFrom4([4]byte{172, 30, byte(i >> 8), byte(i)})}, Port: 80, Protocol: model.TCP,
		}
		for j := 0; j < 3; j++ {
			sp.Endpoints = append(sp.Endpoints, model.Endpoint{IP: netip.AddrFrom4([4]byte{10, 0, byte(i), byte(j)}), Port: 8080, Ready: true, Serving: true})
		}
		s.Services[sp.Name] = sp
	}
	return s
}

func TestChangeMakesEachKindOfChange(t *testing.T) {
	a := snap(1000)
	b := Change(a, 300)
	var replaced, removed, zero, added, same int
	for name, sp := range a.Services {
		nb, ok := b.Services[name]
		switch {
		case !ok:
			removed++
		case nb == sp:
			same++
		case len(nb.Endpoints) == 0:
			zero++
		case nb.Endpoints[0].IP != sp.Endpoints[0].IP && nb.Endpoints[1].IP == sp.Endpoints[1].IP:
			replaced++
		default:
			t.Errorf("%v changed in an unexpected way", name)
		}
	}
	for name := range b.Services {
		if a.Services[name] == nil {
			added++
		}
	}
	if replaced != 75 || removed != 75 || zero != 75 || added != 75 || same != 1000-225 {
		t.Fatalf("replaced %d removed %d zero %d added %d same %d; want 75 of each change, 775 shared", replaced, removed, zero, added, same)
	}
	if len(a.Services) != 1000 {
		t.Fatal("Change modified its input")
	}
	if d := len(b.Diff(a)); d != 300 {
		t.Fatalf("Diff finds %d changed ports, want 300", d)
	}
}

func TestAtomic(t *testing.T) {
	m := Mode{Group: func(phase Phase, u string) (string, bool) {
		if phase == Partial {
			return "all", !strings.HasPrefix(u, "~")
		}
		return u, !strings.HasPrefix(u, "~")
	}}
	before := State{"t1": "a1", "t2": "a2", "f": "foreign", "gone": "x"}
	target := State{"t1": "b1", "t2": "b2", "f": "foreign", "new": "y"}
	for _, c := range []struct {
		name  string
		phase Phase
		got   State
		desc  string
		fails string
	}{
		{"old", Partial, State{"t1": "a1", "t2": "a2", "f": "foreign", "gone": "x"}, "old", ""},
		{"new", Partial, State{"t1": "b1", "t2": "b2", "f": "foreign", "new": "y"}, "new", ""},
		{"mixed tables in one batch", Partial, State{"t1": "b1", "t2": "a2", "f": "foreign", "gone": "x"}, "mixed: 3 units old, 1 new", "half applied"},
		{"mixed tables, one batch each", First, State{"t1": "b1", "t2": "a2", "f": "foreign", "gone": "x"}, "mixed: 3 units old, 1 new", ""},
		{"half a unit", First, State{"t1": "a1+b1", "t2": "a2", "f": "foreign", "gone": "x"}, "old", "neither"},
		{"foreign object changed", First, State{"t1": "a1", "t2": "a2", "f": "", "gone": "x"}, "old", "neither"},
		{"unchecked unit", Partial, State{"t1": "a1", "t2": "a2", "f": "foreign", "gone": "x", "~garbage": "z"}, "old", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			desc, err := Atomic(m, c.phase, c.got, before, target)
			if desc != c.desc {
				t.Errorf("described as %q, want %q", desc, c.desc)
			}
			switch {
			case c.fails == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case c.fails != "" && (err == nil || !strings.Contains(err.Error(), c.fails)):
				t.Errorf("error %v, want one mentioning %q", err, c.fails)
			}
		})
	}
}

func TestDiff(t *testing.T) {
	if d := Diff(State{"a": "1\n2"}, State{"a": "1\n2"}); d != "" {
		t.Fatalf("equal states differ: %s", d)
	}
	d := Diff(State{"a": "1\n2\n2", "x": "stale"}, State{"a": "1\n2", "y": "want"})
	for _, want := range []string{`extra unit "x"`, `missing unit "y"`, `unit "a" differs`, "+ 2"} {
		if !strings.Contains(d, want) {
			t.Errorf("diff lacks %q:\n%s", want, d)
		}
	}
}
