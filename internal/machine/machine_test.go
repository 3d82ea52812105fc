package machine

import "testing"

func TestLoadAvg(t *testing.T) {
	for in, want := range map[string]string{
		"0.52 0.61 0.70 2/345 6789\n": "0.52 0.61 0.70",
		"0.52 0.61":                   "?",
		"":                            "?",
	} {
		if got := loadAvg(in); got != want {
			t.Errorf("loadAvg(%q) = %q, want %q", in, got, want)
		}
	}
	if LoadAvg() == "" || Kernel() == "" {
		t.Error("empty description of this machine")
	}
}
